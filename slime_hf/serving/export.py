"""The language model of a SliME checkpoint as a plain decoder folder that vLLM loads.

vLLM runs only SliME's language model, fed the assembled prompt as `prompt_embeds`; the front end (processor, vision
tower, adapters, router, assembly) stays in this package. The folder holds the decoder built from `text_config`
(its Auto causal-LM class, e.g. `LlamaForCausalLM`) with SliME's `language_model` and `lm_head` weights, and the
tokenizer (vLLM detokenizes the answers and applies stop strings with it).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch


EXPORT_FORMAT = 1  # bump when the folder's layout changes: older cached exports are then rebuilt
COMPLETE_MARKER = "slime_export.json"


def export_language_model(model, folder: str | os.PathLike, tokenizer=None) -> Path:
    """Writes the language model and `lm_head` of a SliME model as a plain decoder folder.

    Args:
        model ([`SliMEForConditionalGeneration`]): the model to export (any dtype; the weights are saved as they are).
        folder (`str` or `os.PathLike`): the folder to write (created; existing files are overwritten).
        tokenizer (`PreTrainedTokenizerBase`, *optional*): saved next to the weights (the processor's tokenizer).

    Returns:
        `Path`: the folder, loadable by `AutoModelForCausalLM.from_pretrained` and by vLLM.
    """
    from transformers import AutoModelForCausalLM

    text_config = model.config.text_config
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dtype = model.lm_head.weight.dtype
    with torch.device("meta"):
        decoder = AutoModelForCausalLM.from_config(text_config, dtype=dtype)
    state = {f"model.{name}": tensor for name, tensor in model.model.language_model.state_dict().items()}
    state["lm_head.weight"] = model.lm_head.weight
    expected = set(decoder.state_dict())
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(
            f"the language model's weights do not match {type(decoder).__name__}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    decoder.load_state_dict(state, assign=True, strict=True)
    decoder.config.tie_word_embeddings = False  # lm_head is saved as its own tensor
    # vLLM stops at the ids of the folder's generation config: the ones SliME's generate stops at
    eos = getattr(model.generation_config, "eos_token_id", None)
    decoder.generation_config.eos_token_id = eos if eos is not None else text_config.eos_token_id
    decoder.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def export_cache_key(model_path: str | os.PathLike, revision: str | None = None, dtype: str = "") -> str:
    """A folder name for the export of a model: its name, then a hash of its location, revision and export dtype (a
    local folder's revision is the size and modification time of its config and weight files, so a rewritten folder
    re-exports)."""
    path = Path(model_path)
    if revision is None and path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".safetensors", ".bin"))
        revision = ";".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    location = path.resolve() if path.is_dir() else model_path
    digest = hashlib.sha256(f"{EXPORT_FORMAT}|{location}|{revision}|{dtype}".encode())
    name = "".join(c if c.isalnum() or c in "-_." else "-" for c in path.name or str(model_path))[:64]
    return f"{name}-{digest.hexdigest()[:16]}"


def default_export_root() -> Path:
    """Where exports are cached: `$SLIME_SERVE_CACHE`, else `$XDG_CACHE_HOME/slime-hf/serving` (`~/.cache/...`)."""
    if os.environ.get("SLIME_SERVE_CACHE"):
        return Path(os.environ["SLIME_SERVE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "slime-hf" / "serving"


def is_complete_export(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds a finished export (the marker is written last)."""
    return (Path(folder) / COMPLETE_MARKER).is_file()


def cached_export(model, tokenizer, folder: str | os.PathLike, source: str) -> Path:
    """Exports into `folder` unless a finished export is there already; writes into a temporary sibling first and
    renames it, so an interrupted export is never taken for a finished one."""
    folder = Path(folder)
    if is_complete_export(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        export_language_model(model, staging, tokenizer)
        (staging / COMPLETE_MARKER).write_text(json.dumps({"format": EXPORT_FORMAT, "source": source}, indent=2))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return folder
