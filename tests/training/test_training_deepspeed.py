"""DeepSpeed ZeRO-2 / ZeRO-3 with two CPU processes (gloo), through `torchrun -m slime_hf.train --deepspeed`.

DeepSpeed is an optional extra that `make test` does not install; `make test-deepspeed` installs it and runs these
tests (its CPU backend compiles a small communication op with the system C++ compiler on first use). The example
configs of `examples/train/` are used unchanged. Each ZeRO run is compared with one process holding twice the batch.

Weights are compared after SGD steps for ZeRO-3: AdamW divides each gradient by its running RMS, so float rounding in
near-zero gradients (ZeRO-3 reduces them in another order) grows to about 1e-4 in the weights (plain DDP shows the
same, 1.3e-5, in stage 3), while SGD keeps the comparison at the precision of the reduction itself.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES, PROJECT_ROOT
from training_helpers import (
    LORA_ARGS,
    common_cli_args,
    make_two_process_workspace,
    run_train_cli,
    stage_1a_args,
    stage_3_args,
)


pytest.importorskip("deepspeed")
pytestmark = [pytest.mark.slow, pytest.mark.deepspeed]
SEED = 7
CONFIGS = PROJECT_ROOT / "examples" / "train"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_two_process_workspace(tmp_path_factory.mktemp("deepspeed"))


@pytest.fixture(autouse=True)
def cpu_accelerator(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")


def stage_1a(workspace, fresh: bool = False) -> list[str]:
    """Stage 1a from the base LLM, with freshly initialised adapters or the fixture's."""
    given = [] if fresh else ["--pretrained_adapters", str(FIXTURES / "V" / "adapters")]
    return stage_1a_args(workspace, *given)


def run(workspace, name: str, stage_args: list[str], zero: int | None, **overrides):
    output = workspace / name
    if zero is None:
        args = common_cli_args(output, per_device_train_batch_size=2, seed=SEED, **overrides)
        result = run_train_cli(stage_args + args, cwd=workspace)
    else:
        args = common_cli_args(
            output,
            per_device_train_batch_size=1,
            seed=SEED,
            ddp_backend="gloo",
            deepspeed=CONFIGS / f"zero{zero}.json",
            log_level="info",
            **overrides,
        )
        result = run_train_cli(stage_args + args, cwd=workspace, nproc=2, timeout=400)
        assert f"distributed setup: DEEPSPEED ZeRO-{zero} over 2 process(es)" in result.stdout + result.stderr
    history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    return output, [entry["loss"] for entry in history if "loss" in entry]


def max_difference(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_zero2_stage_1a_equals_one_process_with_twice_the_batch(workspace):
    single, expected = run(workspace, "single_1a", stage_1a(workspace), None)
    zero2, actual = run(workspace, "zero2_1a", stage_1a(workspace), 2)
    assert len(expected) == len(actual) == 4
    assert max(abs(a - b) for a, b in zip(expected, actual)) <= 1e-5
    adapters = "slime_adapters.safetensors"
    assert max_difference(load_file(str(single / adapters)), load_file(str(zero2 / adapters))) <= 1e-5


@pytest.mark.parametrize("fresh", [False, True], ids=["given_adapters", "fresh_adapters"])
def test_zero3_stage_1a_saves_gathered_adapters_equal_to_one_process(workspace, fresh):
    """Given adapters are loaded into the partitioned model; fresh ones are drawn from the seed alone, so the
    partitioned build starts where the unpartitioned one does."""
    single, expected = run(workspace, f"single_1a_sgd_{fresh}", stage_1a(workspace, fresh), None, optim="sgd")
    zero3, actual = run(workspace, f"zero3_1a_sgd_{fresh}", stage_1a(workspace, fresh), 3, optim="sgd")
    assert max(abs(a - b) for a, b in zip(expected, actual)) <= 1e-5
    adapters = "slime_adapters.safetensors"
    a, b = load_file(str(single / adapters)), load_file(str(zero3 / adapters))
    assert all(t.numel() > 0 for t in b.values())  # gathered, not the empty ZeRO-3 placeholders
    assert max_difference(a, b) <= 1e-6


def test_zero3_stage_3_with_a_text_only_rank_saves_a_loadable_model(workspace):
    """One rank gets the image sample, the other the text-only one (which runs the dummy image): no hang, the same
    losses, and a full folder in package names that loads."""
    from slime_hf import SliMEForConditionalGeneration

    single, expected = run(workspace, "single_3_sgd", stage_3_args(workspace), None, optim="sgd", max_steps=2)
    zero3, actual = run(workspace, "zero3_3_sgd", stage_3_args(workspace), 3, optim="sgd", max_steps=2)
    assert max(abs(a - b) for a, b in zip(expected, actual)) <= 1e-5
    a, b = load_file(str(single / "model.safetensors")), load_file(str(zero3 / "model.safetensors"))
    assert not [k for k in b if k.startswith("model.language_model.model.")]
    assert max_difference(a, b) <= 1e-6
    model = SliMEForConditionalGeneration.from_pretrained(zero3, dtype=torch.float32)
    assert model.config.training_max_length == 2048


def test_zero3_lora_stage_3_saves_the_same_adapters_as_one_process(workspace):
    """LoRA on the language model of a release in the authors' layout, the vision adapters trained fully (LoRA
    dropout off: one process drawing masks for a batch of two cannot match two processes drawing for one each)."""
    lora = [*LORA_ARGS, "--lora_dropout", "0"]
    single, expected = run(workspace, "single_lora", stage_3_args(workspace) + lora, None, optim="sgd", max_steps=2)
    zero3, actual = run(workspace, "zero3_lora", stage_3_args(workspace) + lora, 3, optim="sgd", max_steps=2)
    assert max(abs(a - b) for a, b in zip(expected, actual)) <= 1e-5
    for name in ("adapter_model.safetensors", "non_lora_trainables.safetensors"):
        a, b = load_file(str(single / name)), load_file(str(zero3 / name))
        assert a and all(t.numel() > 0 for t in b.values())
        assert max_difference(a, b) <= 1e-6, name


def test_zero2_run_continues_from_its_checkpoint_to_the_same_weights(workspace):
    """A run stopped after its checkpoint at step 2 continues (DeepSpeed engine state + adapters, scheduler, RNG,
    data position) to the weights of an uninterrupted run."""
    options = {"save_strategy": "steps", "save_steps": 2, "lr_scheduler_type": "constant"}
    full, expected = run(workspace, "zero2_full", stage_1a(workspace), 2, max_steps=4, **options)
    stopped, _ = run(workspace, "zero2_stopped", stage_1a(workspace), 2, max_steps=2, **options)
    assert (stopped / "checkpoint-2" / "slime_adapters.safetensors").is_file()
    _, continued = run(
        workspace,
        "zero2_stopped",
        stage_1a(workspace),
        2,
        max_steps=4,
        resume_from_checkpoint=str(stopped / "checkpoint-2"),
        **options,
    )
    assert continued == expected
    a, b = load_file(str(full / "slime_adapters.safetensors")), load_file(str(stopped / "slime_adapters.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
