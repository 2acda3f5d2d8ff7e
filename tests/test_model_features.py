"""transformers features on SliME: device_map, attention implementations, gradient checkpointing, dtypes."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import golden_utils as gu
from helpers import save_checkpoint
from slime_hf import SliMEForConditionalGeneration


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory):
    return save_checkpoint("V", tmp_path_factory.mktemp("saved_V"), processor=False)


def _golden_inputs(model, name: str = "single_3crop") -> tuple[dict, dict]:
    golden = gu.case("V", name)
    pixel_values, image_sizes = gu.pixel_inputs(golden["images"])
    inputs = dict(
        input_ids=gu.golden_ids(golden["input_ids"], model.config.image_token_id),
        pixel_values=pixel_values,
        image_sizes=image_sizes,
    )
    return inputs, golden


@pytest.mark.parametrize("source, memory", [("authors_layout", "3MB"), ("saved", "3MB"), ("saved", "2MB")])
def test_device_map_auto_loads_and_reproduces_the_golden(source, memory, saved_folder, tmp_path):
    """A memory cap forces accelerate to split the model (the rest offloaded to disk) at block boundaries; at 2 MB
    the projector and the global adapter are on disk too (each module is called with tensors only)."""
    path = gu.checkpoint_dir("V") if source == "authors_layout" else saved_folder
    model = SliMEForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32, device_map="auto", max_memory={"cpu": memory}, offload_folder=str(tmp_path)
    ).eval()
    placements = set(model.hf_device_map.values())
    assert {"cpu", "disk"} <= placements, model.hf_device_map
    if memory == "2MB":
        assert model.hf_device_map["model.projector"] == model.hf_device_map["model.global_adapter"] == "disk"
    inputs, golden = _golden_inputs(model)
    generated = model.generate(**inputs, do_sample=False, max_new_tokens=24)
    assert generated[:, inputs["input_ids"].shape[1] :].tolist() == golden["generated_new_ids"]


def test_no_split_modules_cover_the_custom_blocks():
    names = set(SliMEForConditionalGeneration._no_split_modules)
    assert {"SliMEResampler", "SliMEGlobalAdapter", "SliMEProjector"} <= names


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_attention_implementations_agree_with_the_golden(implementation, saved_folder):
    model = SliMEForConditionalGeneration.from_pretrained(
        saved_folder, dtype=torch.float32, attn_implementation=implementation
    ).eval()
    assert model.model.language_model.config._attn_implementation == implementation
    inputs, golden = _golden_inputs(model)
    with torch.no_grad():
        logits = model(**inputs).logits[:, -1]
    assert (logits - gu.tensor("V", golden["logits_last_ref"])).abs().max().item() <= 1e-4


def test_sdpa_is_the_default(saved_folder):
    model = SliMEForConditionalGeneration.from_pretrained(saved_folder)
    assert model.model.language_model.config._attn_implementation == "sdpa"


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash-attn is not installed here")
def test_flash_attention_2_is_accepted(saved_folder):
    model = SliMEForConditionalGeneration.from_pretrained(
        saved_folder, dtype=torch.bfloat16, attn_implementation="flash_attention_2"
    )
    assert model.model.language_model.config._attn_implementation == "flash_attention_2"


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(saved_folder):
    def loss_and_grads(checkpointing: bool):
        torch.manual_seed(0)
        model = SliMEForConditionalGeneration.from_pretrained(saved_folder, dtype=torch.float32)
        if checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # its name from transformers 5.2x on
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            assert model.model.language_model.gradient_checkpointing
        model.train()
        inputs, _ = _golden_inputs(model)
        labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == model.config.image_token_id, -100)
        torch.manual_seed(1)  # the same router and gate noise in both runs
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return loss.detach(), grads

    loss_plain, grads_plain = loss_and_grads(False)
    loss_ckpt, grads_ckpt = loss_and_grads(True)
    assert torch.isfinite(loss_plain)
    assert (loss_plain - loss_ckpt).abs().item() <= 1e-6
    assert grads_plain.keys() == grads_ckpt.keys()
    assert not any(name.startswith("model.vision_tower.") for name in grads_plain)  # always frozen
    for name, grad in grads_plain.items():
        assert torch.allclose(grad, grads_ckpt[name], atol=1e-6, rtol=1e-5), name


def test_bfloat16_run_keeps_position_tables_and_stays_close(saved_folder):
    reference = SliMEForConditionalGeneration.from_pretrained(saved_folder, dtype=torch.float32).eval()
    model = SliMEForConditionalGeneration.from_pretrained(saved_folder, dtype=torch.bfloat16).eval()
    assert model.model.projector.linear_1.weight.dtype == torch.bfloat16
    # the sin-cos tables keep their float16 values whatever the run dtype (the original builds them in float16; without
    # that rounding the local tokens move by ~2e-4)
    assert torch.equal(
        model.model.local_compressor.position_table.float(), reference.model.local_compressor.position_table.float()
    )
    inputs, _ = _golden_inputs(model)
    with torch.no_grad():
        low = model(**inputs).logits[:, -1].float()
        high = reference(**inputs).logits[:, -1]
    assert (low - high).abs().max().item() < 0.1 * high.abs().max().item()


def test_right_padded_prompts_generate_the_same_answers(saved_folder):
    model = SliMEForConditionalGeneration.from_pretrained(saved_folder, dtype=torch.float32).eval()
    goldens = [gu.case("V", "text_only"), gu.case("V", "single_3crop")]
    rows = [gu.golden_ids(g["input_ids"], model.config.image_token_id)[0] for g in goldens]
    width = max(len(r) for r in rows)
    input_ids = torch.zeros(2, width, dtype=torch.long)
    attention_mask = torch.zeros(2, width, dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, : len(row)] = row
        attention_mask[index, : len(row)] = 1
    pixel_values, image_sizes = gu.pixel_inputs(goldens[1]["images"])
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=pixel_values,
        image_sizes=image_sizes,
        do_sample=False,
        max_new_tokens=24,
    )
    assert torch.equal(out[:, :width], input_ids)
    for index, golden in enumerate(goldens):
        assert out[index, width:].tolist() == golden["generated_new_ids"][0]
