"""The exported decoder folder is SliME's language model: same logits on a text-only prompt; the cache is reused."""

import torch
from transformers import AutoModelForCausalLM

from slime_hf import SliMEForConditionalGeneration, SliMEProcessor
from slime_hf.serving.export import cached_export, export_cache_key, export_language_model, is_complete_export


def test_export_has_the_language_models_logits(tiny_model_dir, tmp_path):
    model = SliMEForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    processor = SliMEProcessor.from_pretrained(tiny_model_dir)
    folder = export_language_model(model, tmp_path / "decoder", processor.tokenizer)
    decoder = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert decoder.config.head_dim == 32 if hasattr(decoder.config, "head_dim") else True
    inputs = processor(text="A short prompt about the sea.", return_tensors="pt")
    with torch.inference_mode():
        expected = model(**inputs).logits
        exported = decoder(**inputs).logits
    torch.testing.assert_close(exported, expected, rtol=0, atol=0)
    assert (folder / "tokenizer_config.json").is_file()


def test_cached_export_is_reused_and_keyed_by_revision(tiny_model_dir, tmp_path):
    model = SliMEForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    folder = cached_export(model, None, tmp_path / "cache" / export_cache_key(tiny_model_dir), "tiny")
    assert is_complete_export(folder)
    weights = folder / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert cached_export(model, None, folder, "tiny") == folder
    assert weights.stat().st_mtime_ns == stamp  # not written again
    assert export_cache_key("org/model", "abc") != export_cache_key("org/model", "def")
    assert export_cache_key("org/model", "abc", "float32") != export_cache_key("org/model", "abc", "bfloat16")
    assert export_cache_key(tiny_model_dir) == export_cache_key(tiny_model_dir)
