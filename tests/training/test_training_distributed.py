"""Two processes on the CPU (gloo): DDP through `torchrun -m slime_hf.train`, and FSDP2 (`fully_shard`).

accelerate turns FSDP on only for accelerator devices (its MULTI_CPU mode falls back to DDP), so `--fsdp` of the
Trainer cannot run here; the FSDP test shards the model with torch's `fully_shard` directly, with the wrapping
classes of the example configs, and checks the same losses and the gathered adapter weights.
"""

from __future__ import annotations

import json
import os

import pytest
from safetensors.torch import load_file

from conftest import FIXTURES
from helpers import python_env, run_python
from training_helpers import (
    IMAGE_FOLDER,
    common_cli_args,
    make_two_process_workspace,
    run_train_cli,
    stage_1a_args,
    stage_3_args,
)


pytestmark = pytest.mark.slow
SEED = 7


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_two_process_workspace(tmp_path_factory.mktemp("distributed"))


def log_losses(output_dir) -> list[float]:
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


def test_ddp_two_processes_equal_one_process_with_twice_the_batch(workspace):
    single, ddp = workspace / "single", workspace / "ddp"
    run_train_cli(
        stage_1a_args(workspace) + common_cli_args(single, per_device_train_batch_size=2, seed=SEED), cwd=workspace
    )
    run_train_cli(
        stage_1a_args(workspace)
        + common_cli_args(
            ddp, per_device_train_batch_size=1, seed=SEED, ddp_backend="gloo", ddp_find_unused_parameters="false"
        ),
        cwd=workspace,
        nproc=2,
    )
    expected, actual = log_losses(single), log_losses(ddp)
    assert len(expected) == len(actual) == 4
    assert max(abs(a - b) for a, b in zip(expected, actual)) <= 1e-5
    a = load_file(str(single / "slime_adapters.safetensors"))
    b = load_file(str(ddp / "slime_adapters.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5


def test_ddp_text_only_batch_on_one_rank_runs_the_same_modules(workspace):
    """Stage 3, one image sample and one text-only sample per step on two ranks, DDP without
    find_unused_parameters: the text-only rank's dummy image keeps the gradient reduction complete."""
    output = workspace / "ddp_text_only"
    run_train_cli(
        stage_3_args(workspace)
        + common_cli_args(
            output,
            per_device_train_batch_size=1,
            max_steps=2,
            seed=SEED,
            ddp_backend="gloo",
            ddp_find_unused_parameters="false",
        ),
        cwd=workspace,
        nproc=2,
        timeout=300,
    )
    values = log_losses(output)
    assert len(values) == 2 and all(v == v for v in values)


FSDP_WORKER = r"""
import json, os, sys
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import set_seed

from slime_hf.checkpoints import ADAPTER_PREFIXES, save_adapter_weights
from slime_hf.modeling_slime import SliMEProjector, SliMEResampler
from slime_hf.training import SliMEDataCollator, SliMEDataset, prepare_model_for_stage
from slime_hf.training.build import build_from_text_model

base, clip, data_path, images, out = sys.argv[1:6]
distributed = "WORLD_SIZE" in os.environ
if distributed:
    dist.init_process_group("gloo")
rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
set_seed(7)
model, processor = build_from_text_model(base, clip)
prepare_model_for_stage(model, "1a")
data = SliMEDataset(data_path, images, processor, "plain", model_config=model.config)
collate = SliMEDataCollator(processor)
if distributed:
    mesh = init_device_mesh("cpu", (world,))
    wrap = ("LlamaDecoderLayer", "CLIPEncoderLayer")
    for module in model.modules():
        if type(module).__name__ in wrap or isinstance(module, (SliMEResampler, SliMEProjector)):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
model.train()
losses = []
for step in range(2):
    per_rank = 2 // world
    batch = collate([data[2 * step + rank * per_rank + i] for i in range(per_rank)])
    count = (batch["labels"][:, 1:] != -100).sum()
    if distributed:
        dist.all_reduce(count)
    out_ = model(**batch, num_items_in_batch=count)
    (out_.loss * world).backward()  # FSDP averages gradients over ranks
    optimizer.step()
    optimizer.zero_grad()
    loss = out_.loss.detach().clone()
    if distributed:
        dist.all_reduce(loss)
    losses.append(loss.item())
state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
if rank == 0:
    save_adapter_weights({k: v for k, v in state.items() if k.startswith(ADAPTER_PREFIXES)}, out, model.config)
    with open(os.path.join(out, "losses.json"), "w") as handle:
        json.dump(losses, handle)
if distributed:
    dist.destroy_process_group()
"""


def test_fsdp2_two_processes_equal_one_process(workspace):
    script = workspace / "fsdp_worker.py"
    script.write_text(FSDP_WORKER)
    env = python_env(OMP_NUM_THREADS="1")
    common = [
        str(workspace / "base_V"),
        str(FIXTURES / "V" / "clip"),
        str(workspace / "plain4.json"),
        str(IMAGE_FOLDER),
    ]
    results = {}
    for name, launcher in (
        ("single", []),
        (
            "fsdp",
            [
                "-m",
                "torch.distributed.run",
                "--nproc_per_node",
                "2",
                "--master_port",
                str(29600 + os.getpid() % 1000),
            ],
        ),
    ):
        out = workspace / f"fsdp_{name}"
        run_python(*launcher, str(script), *common, str(out), cwd=workspace, env=env, timeout=300)
        results[name] = (
            json.loads((out / "losses.json").read_text()),
            load_file(str(out / "slime_adapters.safetensors")),
        )
    (loss_a, weights_a), (loss_b, weights_b) = results["single"], results["fsdp"]
    assert max(abs(a - b) for a, b in zip(loss_a, loss_b)) <= 1e-5
    assert set(weights_a) == set(weights_b)
    assert max((weights_a[k] - weights_b[k]).abs().max().item() for k in weights_a) <= 1e-5
