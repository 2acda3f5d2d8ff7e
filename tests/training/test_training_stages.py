"""Training stages against the goldens of the authors' code: eval losses, router, LLM inputs, trainable sets; optimizer
groups, gradient accumulation and the dummy image of text-only batches."""

from __future__ import annotations

import json
from functools import lru_cache

import numpy as np
import pytest
import torch
from safetensors import safe_open

from conftest import FIXTURES, VARIANTS
from slime_hf import SliMEForConditionalGeneration, SliMEProcessor
from slime_hf.checkpoints import rename_original_key
from slime_hf.training import (
    STAGES,
    SliMEDataCollator,
    SliMEDataset,
    SliMETrainer,
    SliMETrainingArguments,
    prepare_model_for_stage,
)
from training_helpers import IMAGE_FOLDER, cpu_training_arguments


LOSS_TOL = 1e-4
ORIGINAL_IMAGE_ID = -200
# Parameters the original flagged trainable but never used (their gradient is always None): the package leaves them
# frozen on purpose (stages.py docstring).
DELIBERATELY_FROZEN = {
    "1a": {"model.global_adapter.gate_weight", "model.global_adapter.gate_noise_weight"},
    "1b": {
        "model.global_adapter.gate_weight",
        "model.global_adapter.gate_noise_weight",
        "model.global_adapter.attention_expert.position_table",
    },
    "2": {"model.local_compressor.position_table"},
    "3": {"model.global_adapter.gate_noise_weight"},
}


@lru_cache(maxsize=None)
def stages_golden(variant: str) -> dict:
    return json.loads((FIXTURES / variant / "training" / "stages.json").read_text())


@pytest.fixture(scope="module")
def models():
    return {
        v: SliMEForConditionalGeneration.from_pretrained(FIXTURES / v / "checkpoint", dtype=torch.float32)
        for v in VARIANTS
    }


def golden_batch(model, variant: str, prefix: str) -> dict:
    """A collated golden batch as the package's inputs (see the fixtures README, 'Recipe for a loss test')."""
    path = FIXTURES / variant / "training" / "batches.safetensors"
    handle = safe_open(str(path), "pt")
    rows = json.loads(handle.metadata()["rows"])[prefix]
    pixels = np.load(FIXTURES / variant / "training" / "pixels.npz")
    input_ids = handle.get_tensor(f"{prefix}.input_ids")
    arrays = [pixels[name.removesuffix(".png")] for name in rows if name]
    pixel_values = torch.zeros(len(arrays), max(a.shape[0] for a in arrays), 3, 336, 336)
    for index, array in enumerate(arrays):
        pixel_values[index, : len(array)] = torch.from_numpy(array)
    sizes_wh = handle.get_tensor(f"{prefix}.image_sizes")
    return {
        "input_ids": input_ids.masked_fill(input_ids == ORIGINAL_IMAGE_ID, model.config.image_token_id),
        "attention_mask": handle.get_tensor(f"{prefix}.attention_mask"),
        "labels": handle.get_tensor(f"{prefix}.labels"),
        "pixel_values": pixel_values,
        "image_sizes": torch.stack([sizes_wh[r].flip(0) for r, name in enumerate(rows) if name]),
    }


def stage_model(models, variant: str, stage: str):
    model = models[variant]
    prepare_model_for_stage(model, stage)
    return model.eval()


def mapped(names: list[str]) -> set[str]:
    return {rename_original_key(name) for name in names}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_matches_the_goldens(models, variant, stage):
    """Eval loss (float32), router kept indices, LLM sequence lengths, trainable set and the parameters that get a
    gradient, per stage."""
    golden = stages_golden(variant)["stages"][stage]
    model = stage_model(models, variant, stage)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    # Differences from the original's requires_grad flags are exactly the deliberate ones.
    assert mapped(golden["trainable_params"]) - trainable == DELIBERATELY_FROZEN[stage]
    assert trainable <= mapped(golden["trainable_params"])
    assert not any(name.startswith("model.vision_tower.") for name in trainable)

    batch = golden_batch(model, variant, "sft" if golden["batch"] == "sft" else "plain")
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    assert abs(out.loss.item() - golden["loss_eval_fp32"]) <= LOSS_TOL
    assert out.attention_mask.sum(1).tolist() == golden["llm_inputs"][0]["lengths"]
    # The golden router list has an empty entry for the text-only row's dummy image, which the package never routes.
    routed = [entry for entry in golden["router"] if entry["local_tokens"]]
    if routed:
        assert [kept.tolist() for kept in out.selected_indices] == [entry["kept_indices"] for entry in routed]
    else:
        assert all(kept.numel() == 0 for kept in out.selected_indices)

    out.loss.backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == mapped(golden["params_with_nonzero_grad_eval"])
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    model.zero_grad(set_to_none=True)

    if stage == "1a":
        batch = golden_batch(model, variant, "plain_same_shape")
        with torch.no_grad():
            loss = model(**batch).loss.item()
        assert abs(loss - golden["loss_eval_fp32_plain_same_shape"]) <= LOSS_TOL


def test_stage_switches_are_saved_in_the_config(models):
    model = models["V"]
    prepare_model_for_stage(model, "3", router_top_p=0.7)
    assert (model.config.global_adapter_mode, model.config.use_global_only, model.config.use_local_only) == (
        "mixture",
        False,
        False,
    )
    assert model.config.router_top_p == 0.7 and model.model.global_adapter.mode == "mixture"
    prepare_model_for_stage(model, "1b")
    assert model.model.global_adapter.mode == "attention" and model.config.use_global_only
    assert model.config.router_top_p == 1.0


def test_optimizer_groups_adapter_lr_and_no_decay(models, tmp_path):
    model = stage_model(models, "L", "3")
    args = SliMETrainingArguments(
        output_dir=str(tmp_path),
        stage="3",
        learning_rate=2e-5,
        adapter_lr=2e-6,
        weight_decay=0.05,
        use_cpu=True,
        report_to="none",
    )
    processor = SliMEProcessor.from_pretrained(FIXTURES / "L" / "checkpoint")
    trainer = SliMETrainer(model=model, args=args, data_collator=SliMEDataCollator(processor))
    optimizer = trainer.create_optimizer()
    names = {id(p): n for n, p in model.named_parameters()}
    grouped = [{names[id(p)] for p in group["params"]} for group in optimizer.param_groups]
    assert set().union(*grouped) == {n for n, p in model.named_parameters() if p.requires_grad}
    for group, members in zip(optimizer.param_groups, grouped):
        adapters = {n.split(".")[1] in ("projector", "global_adapter", "local_compressor") for n in members}
        assert len(adapters) == 1
        assert group["lr"] == (2e-6 if adapters.pop() else 2e-5)
        for name in members:
            no_decay = name.endswith("bias") or "norm" in name
            assert group["weight_decay"] == (0.0 if no_decay else 0.05), name


def test_text_only_training_batch_reaches_every_trained_module(models):
    """A text-only batch in training runs a dummy image through the trained modules (zero contribution): every
    trained parameter gets a (zero) gradient, so DDP and ZeRO-3 see the same modules on every rank."""
    data = SliMEDataset(
        json.loads((FIXTURES / "V" / "training" / "sft_samples.json").read_text())["samples"],
        IMAGE_FOLDER,
        SliMEProcessor.from_pretrained(FIXTURES / "V" / "checkpoint"),
        "vicuna_v1",
    )
    batch = SliMEDataCollator(data.processor)([data[2]])
    assert "pixel_values" not in batch
    for stage in STAGES:
        model = stage_model(models, "V", stage)
        with torch.no_grad():
            eval_loss = model(**batch).loss
        model.train()
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        assert torch.equal(loss.detach(), eval_loss)
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, (stage, missing)
        adapters = [
            p.grad
            for n, p in model.named_parameters()
            if p.requires_grad and n.split(".")[1] in ("projector", "global_adapter", "local_compressor")
        ]
        assert adapters and all(not g.any() for g in adapters)
        model.zero_grad(set_to_none=True)
    model.eval()


def module_call_order(model, batch: dict) -> list[str]:
    """The modules that own parameters, in the order a training forward calls them (what ZeRO-3 gathers)."""
    calls, handles = [], []
    for name, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            handles.append(module.register_forward_pre_hook(lambda m, args, name=name: calls.append(name)))
    try:
        model(**batch).loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
    return calls


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_batch_calls_the_same_modules_in_the_same_order(models, stage):
    """Ranks of a ZeRO-3 run gather each module's parameters collectively when it is called: a text-only batch, a
    batch with one image row and a batch with two image rows must call the same modules in the same order."""
    processor = SliMEProcessor.from_pretrained(FIXTURES / "V" / "checkpoint")
    data = SliMEDataset(
        json.loads((FIXTURES / "V" / "training" / "sft_samples.json").read_text())["samples"],
        IMAGE_FOLDER,
        processor,
        "vicuna_v1",
    )
    collate = SliMEDataCollator(processor)
    text_only, one_image, two_images = collate([data[2]]), collate([data[0], data[2]]), collate([data[0], data[1]])
    assert "pixel_values" not in text_only and two_images["pixel_values"].shape[0] == 2
    model = stage_model(models, "V", stage).train()
    try:
        orders = [module_call_order(model, batch) for batch in (text_only, one_image, two_images)]
    finally:
        model.eval()
    assert orders[0] == orders[1] == orders[2]
    assert any(name.startswith("model.vision_tower.") for name in orders[0])


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    """num_items_in_batch normalisation: 2 micro-batches of 1 accumulated == 1 batch of 2 (stage 1a: no noise; the
    two captions have different target counts, so a per-micro-batch mean would differ)."""
    processor = SliMEProcessor.from_pretrained(FIXTURES / "V" / "checkpoint")
    samples = json.loads((FIXTURES / "V" / "training" / "plain_samples.json").read_text())["samples"]
    data = SliMEDataset(samples[:2], IMAGE_FOLDER, processor, "plain")
    results = []
    for batch_size, accumulation in ((2, 1), (1, 2)):
        model = SliMEForConditionalGeneration.from_pretrained(FIXTURES / "V" / "checkpoint", dtype=torch.float32)
        prepare_model_for_stage(model, "1a")
        args = cpu_training_arguments(
            tmp_path / f"ga{accumulation}",
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            lr_scheduler_type="constant",
        )
        trainer = SliMETrainer(model=model, args=args, train_dataset=data, data_collator=SliMEDataCollator(processor))
        output = trainer.train()
        results.append((output.training_loss, model.state_dict()))
    (loss_a, weights_a), (loss_b, weights_b) = results
    assert abs(loss_a - loss_b) <= 1e-5
    assert max((weights_a[k] - weights_b[k]).abs().max().item() for k in weights_a) <= 1e-6
    assert any(
        not torch.equal(weights_a[k], w)
        for k, w in SliMEForConditionalGeneration.from_pretrained(FIXTURES / "V" / "checkpoint").state_dict().items()
    )
