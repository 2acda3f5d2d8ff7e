"""Quantized loading (bitsandbytes 8-bit and 4-bit, torchao int8 weight-only, optimum-quanto int8) on CPU.

The model itself declares the modules that are never quantized (vision tower, MLP expert, global adapter, local
compressor with their position tables; the router has no weights): the router's inputs are then those of the
unquantized model, so the kept local tokens equal float32's whatever the text model is quantized to. Only the
text model's Linear layers are quantized.

The float32 references are the goldens: `selected_indices` and `generated_new_ids` (greedy) of the V fixture,
which the float32 model reproduces (tests/test_modeling.py). `pytest -s` prints each backend's kept-token
agreement and greedy prefix against float32.
"""

from __future__ import annotations

import math
from functools import lru_cache

import pytest
import torch
from torch import nn

import golden_utils as gu
from slime_hf import SliMEForConditionalGeneration, SliMEModel
from test_model_features import _golden_inputs, saved_folder  # noqa: F401  (saved_folder: the V fixture as a package folder)


CASES = ("single_3crop", "single_7crop", "tall_extreme", "two_images", "top_p_0.5")
NEW_TOKENS = 4
UNQUANTIZED = ("vision_tower", "projector", "global_adapter", "local_compressor")


def _bnb(**kwargs):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(**kwargs)


def _torchao_int8_weight_only():
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    return TorchAoConfig(Int8WeightOnlyConfig())


def _quanto_int8():
    from transformers import QuantoConfig

    return QuantoConfig(weights="int8")


# backend -> (package it needs, its quantization config, is a text-model Linear quantized)
BACKENDS = {
    "bnb_8bit": ("bitsandbytes", lambda: _bnb(load_in_8bit=True), lambda m: type(m).__name__ == "Linear8bitLt"),
    "bnb_4bit": ("bitsandbytes", lambda: _bnb(load_in_4bit=True), lambda m: type(m).__name__ == "Linear4bit"),
    "torchao_int8_weight_only": (
        "torchao",
        _torchao_int8_weight_only,
        lambda m: type(m.weight).__module__.startswith("torchao."),
    ),
    "quanto_int8": ("optimum.quanto", _quanto_int8, lambda m: type(m).__name__ == "QLinear"),
}


@lru_cache(maxsize=None)
def _quantized(backend: str, folder: str) -> SliMEForConditionalGeneration:
    """The saved V fixture loaded with `backend` (once per backend and folder)."""
    package, make_config, _ = BACKENDS[backend]
    pytest.importorskip(package, reason=f"{package} is not installed (pip install 'slime-hf[quant]')")
    return SliMEForConditionalGeneration.from_pretrained(folder, quantization_config=make_config()).eval()


@lru_cache(maxsize=None)
def _run(backend: str, folder: str) -> dict:
    """Per case: kept indices of the forward output and the greedy new ids (the model is loaded once)."""
    model = _quantized(backend, folder)
    results = {}
    for name in CASES:
        inputs, golden = _golden_inputs(model, name)
        inputs["router_top_p"] = golden["top_p"]
        with torch.no_grad():
            outputs = model(**inputs)
        generated = model.generate(**inputs, do_sample=False, max_new_tokens=NEW_TOKENS)
        results[name] = {
            "kept": [indices.tolist() for indices in outputs.selected_indices],
            "new_ids": generated[0, inputs["input_ids"].shape[1] :].tolist(),
            "vocab_size": outputs.logits.shape[-1],
            "logits_diff": (outputs.logits[0, -1].float() - gu.tensor("V", golden["logits_last_ref"])[0])
            .abs()
            .max()
            .item(),
        }
    return results


def _agreement(results: dict) -> tuple[int, int, float, list[int]]:
    """(images whose kept indices equal float32's, images, IoU of kept indices, greedy prefix per case)."""
    same = total = intersection = union = 0
    prefixes = []
    for name, result in results.items():
        golden = gu.case("V", name)
        for kept, image in zip(result["kept"], golden["images"]):
            reference = gu.selected(image)
            total += 1
            same += kept == reference
            intersection += len(set(kept) & set(reference))
            union += len(set(kept) | set(reference))
        reference_ids = golden["generated_new_ids"][0][:NEW_TOKENS]
        prefix = 0
        while (
            prefix < len(reference_ids)
            and prefix < len(result["new_ids"])
            and result["new_ids"][prefix] == reference_ids[prefix]
        ):
            prefix += 1
        prefixes.append(prefix)
    return same, total, intersection / union, prefixes


@pytest.fixture(scope="module")
def float32_model(saved_folder):
    return SliMEForConditionalGeneration.from_pretrained(saved_folder, dtype=torch.float32).eval()


def test_the_model_declares_the_modules_that_are_never_quantized():
    assert set(UNQUANTIZED) <= set(SliMEModel._keep_in_fp32_modules or ())
    assert {f"model.{name}" for name in UNQUANTIZED} <= set(SliMEForConditionalGeneration._keep_in_fp32_modules or ())


@pytest.mark.filterwarnings("ignore:MatMul8bitLt")
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_only_the_text_model_is_quantized(backend, saved_folder, float32_model):
    model = _quantized(backend, str(saved_folder))
    _, _, is_quantized = BACKENDS[backend]
    text_linears = [m for m in model.model.language_model.modules() if isinstance(m, nn.Linear)]
    assert text_linears and all(is_quantized(m) for m in text_linears), {type(m).__name__ for m in text_linears}
    for prefix in UNQUANTIZED:
        module = getattr(model.model, prefix)
        for name, linear in module.named_modules():
            if isinstance(linear, nn.Linear):
                assert type(linear) is nn.Linear and type(linear.weight) is nn.Parameter, f"{prefix}.{name}"
        for name, parameter in module.named_parameters():
            reference = float32_model.get_parameter(f"model.{prefix}.{name}")
            # the dtypes of the float32 load (position tables stay float16: the original rounds them to float16, and
            # the kept local tokens depend on that rounding), the same values
            assert type(parameter) is nn.Parameter and parameter.dtype == reference.dtype, f"{prefix}.{name}"
            assert torch.equal(parameter, reference), f"{prefix}.{name}"


def test_user_skip_lists_do_not_quantize_the_vision_path(saved_folder):
    """The model's declaration holds whatever the user passes (here a skip list naming only the head)."""
    pytest.importorskip("bitsandbytes")
    model = SliMEForConditionalGeneration.from_pretrained(
        saved_folder, quantization_config=_bnb(load_in_8bit=True, llm_int8_skip_modules=["lm_head"])
    )
    assert type(model.model.projector.linear_1) is nn.Linear
    assert type(model.model.vision_tower.encoder.layers[0].mlp.fc1) is nn.Linear
    assert type(model.model.language_model.layers[0].mlp.down_proj).__name__ == "Linear8bitLt"


@pytest.mark.filterwarnings("ignore:MatMul8bitLt")
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_quantized_model_generates_with_an_image(backend, saved_folder):
    results = _run(backend, str(saved_folder))
    same, total, iou, prefixes = _agreement(results)
    diffs = ", ".join(f"{results[name]['logits_diff']:.3f}" for name in CASES)
    print(
        f"\n[{backend}] kept indices equal to float32's: {same}/{total} images (IoU {iou:.4f}); "
        f"greedy prefix equal to float32's per case: {prefixes} of {NEW_TOKENS}; "
        f"max |last logits - float32| per case: {diffs}"
    )
    for name in CASES:
        assert len(results[name]["new_ids"]) == NEW_TOKENS, name
        assert all(0 <= i < results[name]["vocab_size"] for i in results[name]["new_ids"]), name
        assert math.isfinite(results[name]["logits_diff"]), name


@pytest.mark.filterwarnings("ignore:MatMul8bitLt")
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_kept_tokens_equal_float32(backend, saved_folder):
    """The router's inputs are unquantized: the kept local tokens are float32's, for every golden image case."""
    results = _run(backend, str(saved_folder))
    for name in CASES:
        assert results[name]["kept"] == [gu.selected(image) for image in gu.case("V", name)["images"]], name


def test_float16_load_keeps_the_declared_modules_in_float32(saved_folder):
    """transformers keeps `_keep_in_fp32_modules` in float32 under a float16 load: the vision path then routes as
    float32 (with the whole model in float16, single_3crop and two_images keep other local tokens)."""
    model = SliMEForConditionalGeneration.from_pretrained(saved_folder, dtype=torch.float16).eval()
    assert model.model.language_model.layers[0].mlp.down_proj.weight.dtype == torch.float16
    for prefix in UNQUANTIZED:
        assert {p.dtype for p in getattr(model.model, prefix).parameters()} == {torch.float32}, prefix
    for name in ("single_3crop", "two_images"):
        inputs, golden = _golden_inputs(model, name)
        with torch.no_grad():
            outputs = model(**inputs, router_top_p=golden["top_p"])
        assert outputs.logits.dtype == torch.float16
        assert [k.tolist() for k in outputs.selected_indices] == [gu.selected(image) for image in golden["images"]]
