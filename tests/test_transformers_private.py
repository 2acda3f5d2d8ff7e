"""Tripwires for the two places where the package relies on transformers internals (no public API in 5.17 - 5.25).

1. `SliMEPreTrainedModel.save_pretrained` keeps only the used entries of the private `model._weight_conversions`
   (the key conversions `from_pretrained` recorded and `save_pretrained` reverts), because ZeRO-3 loading keeps every
   candidate conversion and reverting the unused legacy ones would save wrong names.
2. `import slime_hf` appends SliME's image processors to the private list
   `image_processing_auto.DEFAULT_TO_PIL_BACKEND_IMAGE_PROCESSORS`, so that `AutoImageProcessor` asks for the PIL
   backend by default (`slime_hf.image_processing_slime._default_to_pil_backend`).

These tests run on the oldest and the newest supported transformers (`.ci/run`). When one fails, transformers changed
underneath: revisit the workaround (and drop it if a public API now covers it) rather than the test.
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

import golden_utils as gu
from slime_hf import SliMEForConditionalGeneration
from slime_hf.image_processing_slime import _default_to_pil_backend


PACKAGE_PREFIXES = (
    "model.vision_tower.",
    "model.projector.",
    "model.global_adapter.",
    "model.local_compressor.",
    "model.language_model.",
    "lm_head.",
)


def _saved_names(folder) -> set[str]:
    names = set()
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as handle:
            names.update(handle.keys())
    return names


@pytest.fixture(scope="module")
def package_folder(tmp_path_factory):
    """The V fixture saved once in the package's layout (loading it again is a regular `from_pretrained`)."""
    folder = tmp_path_factory.mktemp("package_layout")
    SliMEForConditionalGeneration.from_pretrained(gu.checkpoint_dir("V"), dtype=torch.float32).save_pretrained(folder)
    return folder


@pytest.fixture
def model(package_folder):
    return SliMEForConditionalGeneration.from_pretrained(package_folder, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------------------
# 1. `_weight_conversions`
# ---------------------------------------------------------------------------------------------------------------------
def test_from_pretrained_records_weight_conversions_with_was_used(model):
    """The attribute the workaround reads: a list of transforms that know whether loading used them."""
    conversions = getattr(model, "_weight_conversions", None)
    assert isinstance(conversions, list)
    assert all(callable(getattr(c, "was_used", None)) for c in conversions)


def test_save_pretrained_reverts_what_weight_conversions_holds(model, tmp_path):
    """transformers' own `save_pretrained` still reverts the renamings listed in `_weight_conversions`, used or not."""
    from transformers import PreTrainedModel
    from transformers.core_model_loading import WeightRenaming

    probe = WeightRenaming(source_patterns="^probe_norm", target_patterns="model.language_model.norm")
    model._weight_conversions = [probe]
    assert not probe.was_used()
    PreTrainedModel.save_pretrained(model, tmp_path)  # the base class, without the package's filter
    names = _saved_names(tmp_path)
    assert "probe_norm.weight" in names and "model.language_model.norm.weight" not in names


def test_package_save_drops_unused_conversions(model, tmp_path):
    """The workaround: the package's `save_pretrained` reverts only used conversions, so every candidate conversion
    (what ZeRO-3 loading leaves on the model, legacy renamings included) still saves the package's names."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    candidates = list(get_model_conversion_mapping(model, add_legacy=True))
    probe = WeightRenaming(source_patterns="^probe_norm", target_patterns="model.language_model.norm")
    model._weight_conversions = candidates + [probe]
    assert not any(c.was_used() for c in model._weight_conversions)
    model.save_pretrained(tmp_path)
    names = _saved_names(tmp_path)
    assert len(names) == len(model.state_dict())
    assert all(name.startswith(PACKAGE_PREFIXES) for name in names), sorted(names)
    assert not any(name.startswith("model.language_model.model.") for name in names)


# ---------------------------------------------------------------------------------------------------------------------
# 2. `DEFAULT_TO_PIL_BACKEND_IMAGE_PROCESSORS`
# ---------------------------------------------------------------------------------------------------------------------
def test_default_to_pil_list_exists_and_holds_slime():
    from transformers.models.auto import image_processing_auto

    assert _default_to_pil_backend() is True
    defaults = image_processing_auto.DEFAULT_TO_PIL_BACKEND_IMAGE_PROCESSORS
    assert isinstance(defaults, list)
    assert {"SliMEImageProcessor", "SliMEImageProcessorPil"} <= set(defaults)


def test_default_to_pil_list_decides_the_backend(monkeypatch):
    """Without `backend=`, transformers asks for "pil" for listed classes and for "torchvision" (when importable) for
    the others: the list is still what decides."""
    from transformers.models.auto import image_processing_auto

    _default_to_pil_backend()
    monkeypatch.setattr(image_processing_auto, "is_torchvision_available", lambda: True)
    resolve = image_processing_auto._resolve_backend
    assert resolve(None, None, "SliMEImageProcessorPil") == "pil"
    assert resolve(None, None, "SliMEImageProcessor") == "pil"
    assert resolve(None, None, "CLIPImageProcessor") == "torchvision"
    assert resolve("torch", None, "SliMEImageProcessorPil") == "torch"
