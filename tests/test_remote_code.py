"""A saved folder loads through the Auto classes with `trust_remote_code=True` where `slime_hf` is not importable."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import golden_utils as gu
from conftest import FIXTURES, PROJECT_ROOT
from slime_hf import SliMEForConditionalGeneration, SliMEProcessor


def _converter_hide_package() -> str:
    """The converter's verification runs with `slime_hf` hidden; the tests hide it the same way."""
    import importlib.util

    script = PROJECT_ROOT / "conversion" / "convert_slime_to_hf.py"
    spec = importlib.util.spec_from_file_location("convert_slime_to_hf", script)
    module = sys.modules.get(spec.name)
    if module is None:
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up while being defined
        spec.loader.exec_module(module)
    return module.HIDE_PACKAGE


HIDE_PACKAGE = _converter_hide_package()

REMOTE_SCRIPT = (
    HIDE_PACKAGE
    + """
import json
import torch
from PIL import Image
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoModelForCausalLM, AutoProcessor

try:
    import slime_hf  # noqa: F401
    raise SystemExit("slime_hf should not be importable here")
except ImportError:
    pass

folder, image_path, prompt = sys.argv[1], sys.argv[2], sys.argv[3]
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
model = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
classes = [type(model).__name__]
for auto in (AutoModelForImageTextToText, AutoModelForCausalLM):
    classes.append(type(auto.from_pretrained(folder, trust_remote_code=True)).__name__)
inputs = processor(images=[Image.open(image_path)], text=prompt, return_tensors="pt")
with torch.no_grad():
    out = model(**inputs)
generated = model.generate(**inputs, do_sample=False, max_new_tokens=24)
# What users reach for next, through the remote code: several answers, tuple outputs, assisted decoding, the
# generic processor call of evaluation harnesses.
sampled = model.generate(**inputs, do_sample=True, num_return_sequences=2, max_new_tokens=4)
with torch.no_grad():
    as_tuple = model(**inputs, return_dict=False)
assisted = model.generate(**inputs, do_sample=False, max_new_tokens=24, assistant_model=model)
with_empty_media = processor(images=[Image.open(image_path)], text=prompt, videos=None, audio=None, return_tensors="pt")
print(json.dumps({
    "returned_rows": sampled.shape[0],
    "rows_start_with_prompt": bool((sampled[:, :inputs["input_ids"].shape[1]] == inputs["input_ids"]).all()),
    "tuple_logits_equal": bool(torch.equal(as_tuple[0], out.logits)),
    "assisted_new_ids": assisted[0, inputs["input_ids"].shape[1]:].tolist(),
    "empty_media_ids_equal": bool(torch.equal(with_empty_media["input_ids"], inputs["input_ids"])),
    "classes": classes,
    "config_class": type(AutoConfig.from_pretrained(folder, trust_remote_code=True)).__name__,
    "processor_class": type(processor).__name__,
    "image_processor_class": type(processor.image_processor).__name__,
    "input_ids": inputs["input_ids"][0].tolist(),
    "image_token_id": processor.image_token_id,
    "logits_last": out.logits[0, -1].tolist(),
    "selected": out.selected_indices[0].tolist(),
    "new_ids": generated[0, inputs["input_ids"].shape[1]:].tolist(),
}))
"""
)


def run_hidden(script: str, *args: str, cwd) -> dict:
    """Runs a script in a fresh Python where `slime_hf` cannot be imported; returns its last JSON line."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(cwd / "hf_modules"), TRANSFORMERS_VERBOSITY="error")
    result = subprocess.run(
        [sys.executable, "-c", script, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("variant", ["V", "L"])
def test_auto_classes_load_a_saved_folder_without_the_package(variant, tmp_path):
    checkpoint = gu.checkpoint_dir(variant)
    folder = tmp_path / "saved"
    SliMEForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).save_pretrained(folder)
    SliMEProcessor.from_pretrained(checkpoint).save_pretrained(folder)

    golden = gu.case(variant, "single_3crop")
    image = FIXTURES / golden["image_files"][0]
    out = run_hidden(REMOTE_SCRIPT, str(folder), str(image), golden["prompt"], cwd=tmp_path)

    assert out["classes"] == ["SliMEForConditionalGeneration"] * 3
    assert out["config_class"] == "SliMEConfig"
    assert out["processor_class"] == "SliMEProcessor"
    assert out["image_processor_class"] == "SliMEImageProcessorPil"
    ids = torch.tensor(out["input_ids"])
    ids[ids == out["image_token_id"]] = gu.ORIGINAL_IMAGE_ID
    assert ids.tolist() == gu._json(golden["input_ids"])[0]
    reference = gu.tensor(variant, golden["logits_last_ref"])[0]
    assert (torch.tensor(out["logits_last"]) - reference).abs().max().item() <= 1e-4
    assert out["selected"] == gu.selected(golden["images"][0])
    assert out["new_ids"] == golden["generated_new_ids"][0]
    assert out["returned_rows"] == 2 and out["rows_start_with_prompt"]
    assert out["tuple_logits_equal"]
    assert out["assisted_new_ids"] == golden["generated_new_ids"][0]
    assert out["empty_media_ids_equal"]
