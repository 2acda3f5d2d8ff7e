"""The output config: a [`SliMEConfig`] from the input's config, of either layout, or from a base language model and
the authors' adapter files."""

from __future__ import annotations

import os

import torch

from ..checkpoints import (
    CONFIG_BOOKKEEPING_FIELDS,
    ORIGINAL_MM_FIELDS,
    config_from_original,
    is_original_layout,
    read_json,
    separator_token_id,
)
from ..configuration_slime import SliMEConfig
from ..processing_slime import SliMEProcessor
from .errors import ConversionError


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def read_config_dict(folder: str | None) -> dict | None:
    """The `config.json` of a local folder, or `None` where there is no such folder or file."""
    path = os.path.join(folder, "config.json") if folder and os.path.isdir(folder) else None
    return read_json(path) if path and os.path.isfile(path) else None


def slime_config(config_dict: dict, folder: str, vision_dir: str | None) -> tuple[SliMEConfig, str | None]:
    """A SliMEConfig from a config of either layout; `vision_dir` replaces the authors' `mm_vision_tower`."""
    if is_original_layout(config_dict):
        return config_from_original(config_dict, folder, vision_tower=vision_dir)
    if config_dict.get("model_type") == SliMEConfig.model_type:
        return SliMEConfig.from_dict(config_dict), vision_dir
    raise ConversionError(f"the config in {folder} has model_type {config_dict.get('model_type')!r}, not a SliME model")


def adapters_config(adapters_dir: str, base_dir: str, vision_dir: str) -> SliMEConfig:
    """The config of a stage checkpoint: the language model from `base_dir`, the multimodal fields from the adapter
    files' `config.json` (or the original defaults, separator from the base tokenizer, when there is none)."""
    base = read_config_dict(base_dir)
    if base is None:
        raise ConversionError(f"the base model {base_dir} has no config.json")
    if is_original_layout(base) or base.get("model_type") == SliMEConfig.model_type:
        raise ConversionError(f"--base {base_dir} is a SliME checkpoint; adapter files need the base language model")
    language_fields = {k: v for k, v in base.items() if k not in ORIGINAL_MM_FIELDS}
    adapters = read_config_dict(adapters_dir if os.path.isdir(adapters_dir) else os.path.dirname(adapters_dir)) or {}
    mm_fields = {k: v for k, v in adapters.items() if k in ORIGINAL_MM_FIELDS and k not in CONFIG_BOOKKEEPING_FIELDS}
    if language_fields.get("pad_token_id") is None and adapters.get("pad_token_id") is not None:
        language_fields["pad_token_id"] = adapters["pad_token_id"]  # the original trainer sets it from the tokenizer
    separator = separator_token_id(SliMEProcessor.from_pretrained(base_dir))
    config_dict = {**language_fields, **mm_fields}
    return config_from_original(config_dict, base_dir, vision_tower=vision_dir, separator_token_id=separator)[0]


def default_dtype(config_dict: dict | None) -> torch.dtype:
    """The checkpoint's own dtype (`torch_dtype` of the authors' configs, `dtype` of transformers 5), else float32."""
    name = (config_dict or {}).get("torch_dtype") or (config_dict or {}).get("dtype")
    return DTYPES.get(name, torch.float32)
