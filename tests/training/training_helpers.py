"""Shared pieces of the training tests: base LLMs cut out of the fixture checkpoints, sample files, CLI runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from conftest import FIXTURES, PROJECT_ROOT
from slime_hf import SliMEForConditionalGeneration


IMAGE_FOLDER = FIXTURES / "common" / "images"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def make_base_llm(variant: str, folder: Path) -> Path:
    """The language model of a fixture checkpoint as a plain Llama folder with its tokenizer (a 'base LLM')."""
    checkpoint = FIXTURES / variant / "checkpoint"
    slime = SliMEForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32)
    llm = LlamaForCausalLM(slime.config.text_config)
    llm.model.load_state_dict(slime.model.language_model.state_dict())
    llm.lm_head.load_state_dict(slime.lm_head.state_dict())
    llm.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (checkpoint / name).is_file():
            shutil.copy(checkpoint / name, folder / name)
    return folder


def make_two_process_workspace(root: Path) -> Path:
    """The V base LLM plus `plain4.json` (four captions: two per rank) and `sft2.json` (an image sample and a
    text-only one: one per rank) for the two-process tests."""
    make_base_llm("V", root / "base_V")
    plain = json.loads((FIXTURES / "V" / "training" / "plain_samples.json").read_text())["samples"]
    (root / "plain4.json").write_text(json.dumps(plain + [dict(plain[0], id="plain-3")]))
    sft = json.loads((FIXTURES / "V" / "training" / "sft_samples.json").read_text())["samples"]
    (root / "sft2.json").write_text(json.dumps([sft[0], sft[2]]))
    return root


def write_samples(variant: str, kind: str, path: Path) -> Path:
    """The golden `{kind}_samples.json` samples (LLaVA format) as a training file."""
    samples = json.loads((FIXTURES / variant / "training" / f"{kind}_samples.json").read_text())["samples"]
    path.write_text(json.dumps(samples))
    return path


def run_train_cli(
    args: list[str], cwd: Path, nproc: int | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """Runs `python -m slime_hf.train` (or `torchrun --nproc_per_node N -m slime_hf.train`) on the CPU."""
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(PROJECT_ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
    )
    if nproc:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            str(29500 + os.getpid() % 1000),
            "-m",
            "slime_hf.train",
        ]
    else:
        command = [sys.executable, "-m", "slime_hf.train"]
    result = subprocess.run(command + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def stage_1a_args(workspace: Path, *extra: str) -> list[str]:
    """`python -m slime_hf.train` arguments for stage 1a from the workspace's base LLM and the V fixture's CLIP, on
    the workspace's four plain samples (`extra` goes before the data arguments)."""
    return [
        "--stage",
        "1a",
        "--model_name_or_path",
        str(workspace / "base_V"),
        "--vision_tower",
        str(FIXTURES / "V" / "clip"),
        *extra,
        "--data_path",
        str(workspace / "plain4.json"),
        "--image_folder",
        str(IMAGE_FOLDER),
    ]


def common_cli_args(output_dir: Path, **overrides) -> list[str]:
    """TrainingArguments flags of a fast, deterministic CPU run."""
    args = {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": "2",
        "learning_rate": "1e-2",
        "max_steps": "4",
        "logging_steps": "1",
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": "true",
        "seed": "7",
        "dataloader_num_workers": "0",
        "disable_tqdm": "true",
    }
    args.update({k: str(v) for k, v in overrides.items()})
    return [item for key, value in args.items() for item in (f"--{key}", value)]
