"""Shared pieces of the training tests: workspaces with a base LLM cut out of a fixture checkpoint, sample files, CLI
runs."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from conftest import FIXTURES
from helpers import make_base_llm, python_env, run_python


IMAGE_FOLDER = FIXTURES / "common" / "images"
# LoRA of rank 4 on the language model, the vision adapters trained fully at their own learning rate.
LORA_ARGS = ["--lora_enable", "true", "--lora_r", "4", "--lora_alpha", "8", "--adapter_lr", "1e-3"]


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
    env = python_env(TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    if nproc:
        command = [
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
        command = ["-m", "slime_hf.train"]
    return run_python(*command, *args, cwd=cwd, env=env, timeout=timeout)


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


def stage_3_args(workspace: Path) -> list[str]:
    """`python -m slime_hf.train` arguments for stage 3 from the V fixture's release, on the workspace's `sft2.json`
    (an image sample and a text-only one)."""
    return [
        "--stage",
        "3",
        "--model_name_or_path",
        str(FIXTURES / "V" / "checkpoint"),
        "--data_path",
        str(workspace / "sft2.json"),
        "--image_folder",
        str(IMAGE_FOLDER),
    ]


def cpu_training_arguments(output_dir: Path, **overrides):
    """`SliMETrainingArguments` of a short stage-1a run on the CPU (seed 0, no saving, no reporting); `overrides`
    replace or add fields."""
    from slime_hf.training import SliMETrainingArguments

    fields = dict(
        output_dir=str(output_dir),
        stage="1a",
        per_device_train_batch_size=1,
        max_steps=1,
        learning_rate=1e-3,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
    )
    return SliMETrainingArguments(**{**fields, **overrides})
