"""Writing the output repo: weights, config, code files, generation config, processor and model card."""

from __future__ import annotations

import argparse
import json
import logging
import os

import torch

from ..checkpoints import save_adapter_weights
from ..configuration_slime import SliMEConfig
from ..model_card import save_model_card
from ..modeling_slime import AUTO_MAP, copy_remote_code
from ..processing_slime import SliMEProcessor
from .errors import ConversionError
from .inputs import Conversion
from .writer import parse_size, write_weights


logger = logging.getLogger("slime_hf.conversion")


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.bfloat16` -> `"bfloat16"`."""
    return str(dtype).removeprefix("torch.")


def _save_config(config: SliMEConfig, dtype: torch.dtype, folder: str) -> None:
    """The output's `config.json` (its dtype, architectures and `auto_map`) and the remote-code files."""
    config = SliMEConfig.from_dict(config.to_dict())
    name = dtype_name(dtype)
    for sub in (config, config.text_config, config.vision_config):
        sub.dtype = name
    config.architectures = ["SliMEForConditionalGeneration"]
    config.auto_map = dict(AUTO_MAP)
    config.save_pretrained(folder)
    copy_remote_code(folder)


def write_output(conversion: Conversion, folder: str, args: argparse.Namespace) -> None:
    """Writes the whole repo into `folder`."""
    plan = conversion.plan
    card = dict(
        base_model=conversion.base_model,
        release=conversion.release,
        source=args.input if not os.path.exists(args.input) else os.path.basename(os.path.abspath(args.input)),
        repo_id=args.push_to_hub,
        router_top_p=conversion.config.router_top_p,
    )
    if conversion.kind in ("adapters", "stage"):
        adapters = {name: planned.load() for name, planned in plan.tensors.items()}
        save_adapter_weights(adapters, folder, conversion.config)
        save_model_card(folder, base_model_relation="adapter", stage_checkpoint=True, **dict(card, release=None))
        return
    if conversion.release is not None:
        # A converted release: the card's base model is the release it came from (same weights, the package's
        # layout); the release's language model is named in the card's text.
        card.update(base_model=conversion.release.repo_id, base_model_relation=None)
    write_weights(plan, folder, parse_size(args.max_shard_size))
    _save_config(conversion.config, plan.dtype, folder)
    if conversion.generation_config:
        write_generation_config(conversion.generation_config, folder)
    processor = SliMEProcessor.from_pretrained(conversion.tokenizer_dir, chat_template_name=args.chat_template)
    if processor.image_token_id != conversion.config.image_token_id:
        raise ConversionError(
            f"the tokenizer gives <image> the id {processor.image_token_id}, the config expects "
            f"{conversion.config.image_token_id} (the first id after the vocabulary)"
        )
    processor.save_pretrained(folder)
    save_model_card(folder, chat_template=template_name(processor), **card)


def write_generation_config(source: str, folder: str) -> dict:
    """
    Writes the release's `generation_config.json` into `folder`, every field as the release has it but `max_length`.

    The releases inherit `max_length` from their language model's generation config (4096: the context length, not
    an answer length). transformers 5 counts any `max_length` of the model's generation config as set by the user,
    so every `generate(..., max_new_tokens=N)` would warn "Both `max_new_tokens` (=N) and `max_length`(=4096) seem
    to have been set"; `max_new_tokens` wins anyway, and the model refuses prompts longer than its context. Without
    it, a call that gives no length gets transformers' default (and its advice to pass `max_new_tokens`).

    Returns:
        `dict`: what was written.
    """
    with open(source, encoding="utf-8") as handle:
        values = json.load(handle)
    dropped = values.pop("max_length", None)
    if dropped is not None:
        logger.info(
            f"generation_config.json: the release's max_length={dropped} (its language model's context) is "
            "left out, so that generate(max_new_tokens=...) does not warn on every call"
        )
    with open(os.path.join(folder, "generation_config.json"), "w", encoding="utf-8") as handle:
        handle.write(json.dumps(values, indent=2, sort_keys=True) + "\n")
    return values


def template_name(processor: SliMEProcessor) -> str | None:
    templates = processor.chat_template
    if not isinstance(templates, dict):
        return None
    return next(
        (name for name, text in templates.items() if name != "default" and text == templates.get("default")), None
    )
