"""Deciding a conversion: resolve the inputs, detect their kind, build the config and the checked tensor plan."""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass

import torch

from ..checkpoints import (
    NON_LORA_TRAINABLES_FILES,
    VISION_TOWER_PREFIX,
    LoraAdapter,
    checkpoint_weight_files,
    detect_checkpoint_kind,
    is_original_layout,
    load_adapter_weights,
    load_non_lora_trainables,
    vision_tower_name,
)
from ..configuration_slime import SliMEConfig
from ..model_card import SliMERelease, find_release, match_release
from .configs import DTYPES, adapters_config, default_dtype, read_config_dict, slime_config
from .errors import ConversionError
from .hub import TOKENIZER_FILES, hub_like, resolve_path
from .plan import Plan


logger = logging.getLogger("slime_hf.conversion")


@dataclass
class Conversion:
    """What a conversion decided about its inputs, before anything is written."""

    kind: str
    input_dir: str
    plan: Plan
    tokenizer_dir: str | None = None
    generation_config: str | None = None
    base_model: str | None = None
    release: SliMERelease | None = None
    # Where the package's own loader reads the input directly (the verification's reference), if it can.
    reference_dir: str | None = None

    @property
    def config(self) -> SliMEConfig:
        return self.plan.config


def _add_vision_tower(plan: Plan, vision_dir: str | None, config_vision: str | None) -> None:
    """Adds the CLIP weights when the checkpoint does not hold them (`--vision-tower`, else `mm_vision_tower`)."""
    if any(n.startswith("model.vision_tower.") for n in plan.tensors):
        return
    if vision_dir is None and config_vision:
        vision_dir = resolve_path(config_vision, "vision")
    if vision_dir is None:
        raise ConversionError(
            "the checkpoint holds no vision tower weights: pass the CLIP checkpoint with --vision-tower DIR_OR_ID"
        )
    for path in checkpoint_weight_files(vision_dir):
        plan.add_file(path, names=vision_tower_name)


def _add_mm_projector(plan: Plan, reference: str | None) -> None:
    """Adds the global adapter and MLP expert of `--mm-projector` to an input that lacks them."""
    if reference is None:
        return
    path = resolve_path(reference, "input")
    weights = load_adapter_weights(path)
    wanted = {k: v for k, v in weights.items() if k.startswith(("model.projector.", "model.global_adapter."))}
    if not wanted:
        raise ConversionError(f"--mm-projector {reference} holds no mm_projector (global adapter / MLP expert) weights")
    clash = sorted(k for k in wanted if k in plan.tensors)
    if clash:
        raise ConversionError(f"the input already holds {clash[:3]} ...: --mm-projector is for inputs without them")
    plan.add_tensors(wanted, path)


def _has_non_lora(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, f)) for f in NON_LORA_TRAINABLES_FILES)


def _output_dtype(args: argparse.Namespace, config_dict: dict | None) -> torch.dtype:
    return DTYPES[args.dtype] if args.dtype else default_dtype(config_dict)


def _prepare_adapters(args: argparse.Namespace, kind: str, input_dir: str, vision_dir: str | None) -> Conversion:
    """A stage checkpoint, from the package's stage checkpoint or the authors' adapter files."""
    if kind == "stage":
        config = SliMEConfig.from_pretrained(input_dir)
    else:
        if args.base is None or vision_dir is None:
            raise ConversionError(
                "adapter files need the base language model (--base DIR_OR_ID) and the vision "
                "tower (--vision-tower DIR_OR_ID) for the stage checkpoint's config"
            )
        config = adapters_config(input_dir, resolve_path(args.base, "base"), vision_dir)
    # Stage checkpoints keep the files' dtypes unless --dtype asks otherwise.
    plan = Plan(config, DTYPES[args.dtype] if args.dtype else None)
    plan.add_tensors(load_adapter_weights(input_dir), input_dir)
    _add_mm_projector(plan, args.mm_projector)
    plan.check(only_adapters=True)
    return Conversion(kind, input_dir, plan, base_model=hub_like(args.base))


def _prepare_full(
    args: argparse.Namespace, input_dir: str, vision_dir: str | None, release: SliMERelease | None
) -> Conversion:
    """A full checkpoint (either layout): its shards, the vision tower and `--mm-projector` where it lacks them."""
    config_dict = read_config_dict(input_dir)
    config, config_vision_dir = slime_config(config_dict, input_dir, vision_dir)
    plan = Plan(config, _output_dtype(args, config_dict))
    for path in checkpoint_weight_files(input_dir):
        plan.add_file(path)
    vision_inside = any(n.startswith(VISION_TOWER_PREFIX) for n in plan.tensors)
    _add_vision_tower(plan, vision_dir or config_vision_dir, config_dict.get("mm_vision_tower"))
    _add_mm_projector(plan, args.mm_projector)
    base_model = release.base_model if release else hub_like(config_dict.get("_name_or_path"))
    conversion = Conversion("full", input_dir, plan, tokenizer_dir=input_dir, base_model=base_model)
    if vision_inside and not args.vision_tower and not args.mm_projector:
        conversion.reference_dir = input_dir
    return conversion


def _prepare_lora(
    args: argparse.Namespace, input_dir: str, vision_dir: str | None, release: SliMERelease | None
) -> Conversion:
    """A LoRA release: the base model's shards with the LoRA merged, the non-LoRA trainables over them."""
    lora = LoraAdapter(input_dir)
    base_ref = args.base or lora.base_model_name_or_path
    if not base_ref:
        raise ConversionError(f"{input_dir}/adapter_config.json names no base model: pass --base DIR_OR_ID")
    try:
        base_dir = resolve_path(base_ref, "base")
    except Exception as error:  # noqa: BLE001 - a path of the authors' machine, no network, ...
        raise ConversionError(
            f"cannot find the LoRA's base model {base_ref!r} ({error}); pass --base DIR_OR_ID"
        ) from error
    config_dict = read_config_dict(input_dir) or read_config_dict(base_dir)
    if config_dict is None or not (
        is_original_layout(config_dict) or config_dict.get("model_type") == SliMEConfig.model_type
    ):
        raise ConversionError(f"neither {input_dir} nor the base {base_dir} has a SliME config.json")
    config, config_vision_dir = slime_config(config_dict, input_dir, vision_dir)
    plan = Plan(config, _output_dtype(args, config_dict), lora=lora)
    for path in checkpoint_weight_files(base_dir):
        plan.add_file(path)
    untargeted = sorted(set(lora.targets) - set(plan.tensors))
    if untargeted:
        raise ConversionError(f"the LoRA adapts weights the base model does not have: {untargeted[:8]}")
    if _has_non_lora(input_dir):
        plan.add_tensors(load_non_lora_trainables(input_dir), f"{input_dir}/non_lora_trainables", override=True)
    else:
        logger.warning(f"{input_dir} has no non_lora_trainables file: the adapters come from the base only")
    _add_vision_tower(plan, vision_dir or config_vision_dir, config_dict.get("mm_vision_tower"))
    _add_mm_projector(plan, args.mm_projector)
    has_tokenizer = any(os.path.isfile(os.path.join(input_dir, f)) for f in TOKENIZER_FILES)
    conversion = Conversion(
        "lora",
        input_dir,
        plan,
        tokenizer_dir=input_dir if has_tokenizer else base_dir,
        base_model=hub_like(base_ref) or (release.base_model if release else None),
    )
    if os.path.isfile(os.path.join(base_dir, "generation_config.json")):
        conversion.generation_config = os.path.join(base_dir, "generation_config.json")
    return conversion


def prepare(args: argparse.Namespace) -> Conversion:
    """Resolves the inputs, decides the kind, builds the config and the checked tensor plan (nothing is written)."""
    input_dir = resolve_path(args.input, "input")
    kind = detect_checkpoint_kind(input_dir)
    logger.info(f"{args.input}: {kind} checkpoint")
    vision_dir = resolve_path(args.vision_tower, "vision") if args.vision_tower else None
    release = None if os.path.exists(args.input) else find_release(args.input)
    if args.base and kind == "full":
        logger.warning("--base is ignored: the input is a full checkpoint")
    if kind in ("adapters", "stage"):
        conversion = _prepare_adapters(args, kind, input_dir, vision_dir)
        conversion.release = release
        return conversion
    if kind == "full":
        conversion = _prepare_full(args, input_dir, vision_dir, release)
    else:
        conversion = _prepare_lora(args, input_dir, vision_dir, release)
    conversion.plan.check()
    conversion.release = release
    if conversion.release is None:
        text = conversion.config.text_config
        conversion.release = match_release(text.hidden_size, text.num_hidden_layers, text.vocab_size)
    if os.path.isfile(os.path.join(input_dir, "generation_config.json")):
        conversion.generation_config = os.path.join(input_dir, "generation_config.json")
    return conversion
