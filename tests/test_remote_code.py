"""A saved folder loads through the Auto classes with `trust_remote_code=True` where `slime_hf` is not importable."""

from __future__ import annotations

import pytest
import torch

import golden_utils as gu
from conftest import FIXTURES
from helpers import run_hidden, save_checkpoint


REMOTE_SCRIPT = """
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


@pytest.mark.parametrize("variant", ["V", "L"])
def test_auto_classes_load_a_saved_folder_without_the_package(variant, tmp_path):
    folder = save_checkpoint(variant, tmp_path / "saved")

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


AUTHORS_LAYOUT_SCRIPT = """
import json
from transformers.dynamic_module_utils import get_class_from_dynamic_module

code_folder, checkpoint = sys.argv[1], sys.argv[2]
model_class = get_class_from_dynamic_module("modeling_slime.SliMEForConditionalGeneration", code_folder)
try:
    model_class.from_pretrained(checkpoint)
    outcome = {"error": None}
except ValueError as error:
    outcome = {"error": str(error)}
print(json.dumps(outcome))
"""


def test_remote_code_names_the_package_for_a_checkpoint_in_the_authors_layout(tmp_path):
    """The remote code alone loads saved folders; a checkpoint in the authors' layout needs the installed package,
    and says so in one clear error."""
    from slime_hf import SliMEConfig
    from slime_hf.modeling_slime import copy_remote_code

    code_folder = tmp_path / "code"
    code_folder.mkdir()
    SliMEConfig().save_pretrained(code_folder)
    copy_remote_code(str(code_folder))
    out = run_hidden(AUTHORS_LAYOUT_SCRIPT, str(code_folder), str(gu.checkpoint_dir("V")), cwd=tmp_path)
    assert out["error"] is not None
    assert "model_type 'llava_llama'" in out["error"] and "slime_hf package" in out["error"]
    assert "not installed" in out["error"]
