"""The stages end to end through `python -m slime_hf.train`: 1a -> 1b -> 2 -> 3, LoRA, and resuming a run killed while
saving a checkpoint."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES
from helpers import make_base_llm, python_env, run_python
from slime_hf import SliMEForConditionalGeneration
from slime_hf.checkpoints import ADAPTER_WEIGHTS_NAME, LoraAdapter, load_non_lora_trainables
from slime_hf.training.build import build_from_text_model
from slime_hf.training.trainer import CHECKPOINT_COMPLETE_NAME
from training_helpers import IMAGE_FOLDER, LORA_ARGS, common_cli_args, run_train_cli, stage_1a_args, write_samples


ADAPTERS = ("model.projector.", "model.global_adapter.", "model.local_compressor.")
NEVER_TRAINED = (
    "model.global_adapter.attention_expert.position_table",
    "model.local_compressor.position_table",
    "model.global_adapter.gate_noise_weight",
)
SEED = 7


def losses(output_dir) -> list[float]:
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


def assert_learned(output_dir) -> None:
    values = losses(output_dir)
    assert len(values) >= 3 and all(math.isfinite(v) for v in values)
    assert values[-1] < values[0], values


def changed(before: dict, after: dict) -> set[str]:
    assert set(before) == set(after), set(before) ^ set(after)
    return {k for k in after if not torch.equal(before[k].float(), after[k].float())}


def adapters_of(state_dict: dict) -> dict:
    return {k: v for k, v in state_dict.items() if k.startswith(ADAPTERS)}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    make_base_llm("V", root / "base_V")
    write_samples("V", "plain", root / "plain.json")
    # Stage 3 data: one image sample, the text-only one, the mid-placeholder one (short, fast).
    samples = json.loads((FIXTURES / "V" / "training" / "sft_samples.json").read_text())["samples"]
    (root / "sft.json").write_text(json.dumps([samples[0], samples[2], samples[3]]))
    return root


def test_stage_chain_1a_1b_2_3(workspace):
    base, clip = workspace / "base_V", FIXTURES / "V" / "clip"
    model_args = ["--model_name_or_path", str(base), "--vision_tower", str(clip), "--image_folder", str(IMAGE_FOLDER)]
    outputs = {}
    previous = None
    for stage in ("1a", "1b", "2", "3"):
        outputs[stage] = workspace / f"stage_{stage}"
        data = workspace / ("sft.json" if stage == "3" else "plain.json")
        args = ["--stage", stage, *model_args, "--data_path", str(data)]
        if previous is not None:
            args += ["--pretrained_adapters", str(previous)]
        run_train_cli(args + common_cli_args(outputs[stage], seed=SEED), cwd=workspace)
        assert_learned(outputs[stage])
        previous = outputs[stage]

    # Stage 1a started from the seeded initialisation: rebuild it to compare.
    initial, _ = build_from_text_model(str(base), str(clip), seed=SEED)
    state = {k: v.clone() for k, v in initial.state_dict().items()}
    before = adapters_of(state)
    expected = {
        "1a": {k for k in before if k.startswith("model.projector.")},
        "1b": {k for k in before if k.startswith("model.global_adapter.attention_expert.")} - set(NEVER_TRAINED),
        "2": {k for k in before if k.startswith("model.local_compressor.")} - set(NEVER_TRAINED),
    }
    for stage in ("1a", "1b", "2"):
        files = set(os.listdir(outputs[stage]))
        assert {"config.json", ADAPTER_WEIGHTS_NAME} <= files
        assert not files & {"model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"}
        after = load_file(str(outputs[stage] / ADAPTER_WEIGHTS_NAME))
        assert changed(before, after) == expected[stage], stage  # all adapters saved, only the stage's trained
        before = after

    # Stage 3: everything but the vision tower, the position tables and the gate's noise weight.
    state.update(before)
    final = SliMEForConditionalGeneration.from_pretrained(outputs["3"], dtype=torch.float32)
    saved = final.state_dict()
    unchanged = set(saved) - changed(state, saved)
    assert unchanged == {k for k in saved if k.startswith("model.vision_tower.")} | set(NEVER_TRAINED)
    assert (final.config.router_top_p, final.config.global_adapter_mode) == (0.95, "mixture")
    assert final.config.training_max_length == 2048  # --model_max_length: the model's cut after routing
    checkpoint_config = json.loads((FIXTURES / "V" / "checkpoint" / "config.json").read_text())
    assert final.config.separator_token_id == checkpoint_config["seperator"]  # last id of tokenizer(',')
    assert not final.config.use_global_only and not final.config.use_local_only
    assert (outputs["3"] / "README.md").is_file() and (outputs["3"] / "tokenizer.model").is_file()

    # The stage-3 folder loads with the Auto classes (remote code) and generates.
    script = (
        "import sys, torch\n"
        "from PIL import Image\n"
        "from transformers import AutoModel, AutoProcessor\n"
        "folder, image = sys.argv[1], sys.argv[2]\n"
        "processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)\n"
        "model = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()\n"
        "messages = [{'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': 'What is this?'}]}]\n"
        "prompt = processor.apply_chat_template(messages, add_generation_prompt=True)\n"
        "inputs = processor(images=[Image.open(image)], text=prompt, return_tensors='pt')\n"
        "out = model.generate(**inputs, do_sample=False, max_new_tokens=6)\n"
        "print(type(model).__module__, out.shape[1] - inputs['input_ids'].shape[1])\n"
    )
    env = python_env(with_package=False, modules_cache=workspace / "hf_modules")
    image = IMAGE_FOLDER / "odd_337x211.png"
    result = run_python("-c", script, str(outputs["3"]), str(image), cwd=workspace, env=env, timeout=300)
    module, new_tokens = result.stdout.split()[-2:]
    assert module.startswith("transformers_modules.") and int(new_tokens) == 6


def test_fresh_adapters_depend_on_the_seed_only(workspace):
    """What building the model draws from the RNG before (a ZeRO-3 build draws differently from an unpartitioned
    one) does not change the adapters' initial values."""
    base, clip = str(workspace / "base_V"), str(FIXTURES / "V" / "clip")
    first, _ = build_from_text_model(base, clip, seed=3)
    torch.manual_seed(11)
    torch.randn(1000)
    second, _ = build_from_text_model(base, clip, seed=3)
    a, b = adapters_of(first.state_dict()), adapters_of(second.state_dict())
    assert a and set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    other, _ = build_from_text_model(base, clip, seed=4)
    assert not torch.equal(a["model.projector.linear_1.weight"], other.state_dict()["model.projector.linear_1.weight"])


def test_llama3_variant_stage_1a_then_3(workspace):
    """The Llama-3 fixture (byte-level BPE tokenizer, llama3 chat template, grouped-query attention): stage 1a from
    its base LLM, then stage 3 from 1a's adapters; the output keeps the llama3 template and its separator id."""
    base = make_base_llm("L", workspace / "base_L")
    write_samples("L", "plain", workspace / "plain_L.json")
    samples = json.loads((FIXTURES / "L" / "training" / "sft_samples.json").read_text())["samples"]
    (workspace / "sft_L.json").write_text(json.dumps([samples[0], samples[2], samples[3]]))
    model_args = [
        "--model_name_or_path",
        str(base),
        "--vision_tower",
        str(FIXTURES / "L" / "clip"),
        "--image_folder",
        str(IMAGE_FOLDER),
    ]
    stage1a, stage3 = workspace / "L_1a", workspace / "L_3"
    run_train_cli(
        ["--stage", "1a", *model_args, "--data_path", str(workspace / "plain_L.json")]
        + common_cli_args(stage1a, seed=SEED),
        cwd=workspace,
    )
    run_train_cli(
        [
            "--stage",
            "3",
            *model_args,
            "--data_path",
            str(workspace / "sft_L.json"),
            "--pretrained_adapters",
            str(stage1a),
        ]
        + common_cli_args(stage3, seed=SEED),
        cwd=workspace,
    )
    assert_learned(stage1a)
    assert_learned(stage3)
    final = SliMEForConditionalGeneration.from_pretrained(stage3)
    checkpoint_config = json.loads((FIXTURES / "L" / "checkpoint" / "config.json").read_text())
    assert final.config.separator_token_id == checkpoint_config["seperator"]
    assert final.config.image_token_id == checkpoint_config["vocab_size"]
    assert "<|start_header_id|>" in (stage3 / "chat_template.jinja").read_text()


def test_lora_fine_tune_of_a_release(workspace):
    """Stage 3 with LoRA from a checkpoint in the authors' layout: adapter_model + non_lora_trainables (package names,
    no position tables); peft's loading and the merge of the package's LoRA reader agree."""
    release = FIXTURES / "V" / "checkpoint"
    output = workspace / "lora"
    args = [
        "--stage",
        "3",
        "--model_name_or_path",
        str(release),
        "--data_path",
        str(workspace / "sft.json"),
        "--image_folder",
        str(IMAGE_FOLDER),
        *LORA_ARGS,
    ]
    run_train_cli(args + common_cli_args(output, seed=SEED), cwd=workspace)
    assert_learned(output)
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "non_lora_trainables.safetensors",
        "config.json",
        "tokenizer.model",
    } <= set(os.listdir(output))

    base = SliMEForConditionalGeneration.from_pretrained(release, dtype=torch.float32)
    non_lora = load_non_lora_trainables(output)
    assert set(non_lora) == {k for k in base.state_dict() if k.startswith(ADAPTERS)} - set(NEVER_TRAINED)
    assert changed({k: base.state_dict()[k] for k in non_lora}, non_lora) == set(non_lora)

    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(SliMEForConditionalGeneration.from_pretrained(release), output)
    peft_model.get_base_model().load_state_dict(non_lora, strict=False)
    merged = SliMEForConditionalGeneration.from_pretrained(release, dtype=torch.float32)
    adapter = LoraAdapter(output)
    targets = set(adapter.targets)
    assert targets and all(t.startswith("model.language_model.layers.") for t in targets)
    weights = {
        name: adapter.merge(name, tensor) if name in targets else tensor for name, tensor in merged.state_dict().items()
    }
    weights.update(non_lora)
    merged.load_state_dict(weights)
    inputs = {"input_ids": torch.tensor([[1, 338, 464, 269, 871, 261, 733]])}
    with torch.no_grad():
        expected = peft_model.eval()(**inputs).logits
        actual = merged.eval()(**inputs).logits
        original = base.eval()(**inputs).logits
    assert (expected - actual).abs().max().item() <= 1e-5
    assert (expected - original).abs().max().item() > 1e-4


KILL_DURING_SAVE = """
import os, sys
from slime_hf.train import main
from slime_hf.training.trainer import SliMETrainer

save_optimizer = SliMETrainer._save_optimizer_and_scheduler

def killed_while_saving(self, output_dir):
    if self.state.global_step == int(os.environ["KILL_AT_STEP"]):
        os._exit(3)  # this checkpoint's adapter weights are written; optimizer, RNG and trainer state are not
    save_optimizer(self, output_dir)

SliMETrainer._save_optimizer_and_scheduler = killed_while_saving
main(sys.argv[1:])
"""


def test_run_killed_while_saving_resumes_from_the_last_complete_checkpoint_to_identical_weights(workspace):
    samples = json.loads((workspace / "plain.json").read_text())
    (workspace / "plain4.json").write_text(json.dumps(samples + [dict(samples[0], id="plain-3")]))
    args = stage_1a_args(workspace)
    options = {"max_steps": 6, "save_strategy": "steps", "save_steps": 2, "per_device_train_batch_size": 1}
    uninterrupted = workspace / "uninterrupted"
    run_train_cli(args + common_cli_args(uninterrupted, seed=SEED, **options), cwd=workspace)

    killed = workspace / "killed"
    env = python_env(KILL_AT_STEP="4", OMP_NUM_THREADS="1")
    cli_args = [*args, *common_cli_args(killed, seed=SEED, **options)]
    result = run_python("-c", KILL_DURING_SAVE, *cli_args, cwd=workspace, env=env, check=False)
    assert result.returncode == 3, result.stderr[-3000:]
    assert sorted(p.name for p in killed.iterdir() if p.name.startswith("checkpoint-")) == [
        "checkpoint-2",
        "checkpoint-4",
    ]
    assert {
        "optimizer.pt",
        "scheduler.pt",
        "rng_state.pth",
        "trainer_state.json",
        ADAPTER_WEIGHTS_NAME,
        CHECKPOINT_COMPLETE_NAME,
    } <= set(os.listdir(killed / "checkpoint-2"))
    half_written = set(os.listdir(killed / "checkpoint-4"))
    assert ADAPTER_WEIGHTS_NAME in half_written and not half_written & {"optimizer.pt", CHECKPOINT_COMPLETE_NAME}
    resumed = run_train_cli(
        args + common_cli_args(killed, seed=SEED, resume_from_checkpoint="true", **options), cwd=workspace
    )
    assert f"skipping {killed / 'checkpoint-4'}: its save did not finish" in resumed.stderr
    assert f"resuming from {killed / 'checkpoint-2'}" in resumed.stderr
    assert all((killed / f"checkpoint-{step}" / CHECKPOINT_COMPLETE_NAME).is_file() for step in (2, 4, 6))

    expected = load_file(str(uninterrupted / ADAPTER_WEIGHTS_NAME))
    actual = load_file(str(killed / ADAPTER_WEIGHTS_NAME))
    assert set(expected) == set(actual)
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
    assert losses(killed) == losses(uninterrupted)
