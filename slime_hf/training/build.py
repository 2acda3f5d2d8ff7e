"""Builds the model and processor a training stage starts from.

Stage 1a starts from a text LLM and a CLIP vision tower: the SliME config is made from their configs, their weights
are loaded, and the adapters start from their initialisation (seeded). Later stages add an earlier stage's adapter
weights (`pretrained_adapters`), or start from a full SliME checkpoint (a release, a converted folder, a stage-3
output). Then the stage switches and `requires_grad` are set, and stage 3 may wrap the language model with LoRA.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers import MODEL_MAPPING, AutoConfig, AutoModelForCausalLM
from transformers.utils import logging

from ..checkpoints import is_original_layout, resolve_vision_config, separator_token_id
from ..configuration_slime import SliMEConfig
from ..modeling_slime import SliMEForConditionalGeneration
from ..processing_slime import SliMEProcessor
from .stages import ADAPTER_MODULES, apply_stage_config, freeze_for_stage, get_stage, is_adapter_parameter


logger = logging.get_logger(__name__)


def _torch_dtype(name: str) -> torch.dtype | str:
    return name if name == "auto" else getattr(torch, name)


def _read_config_dict(path: str) -> dict | None:
    """The `config.json` of a local folder or Hub repo, or `None` if it has none."""
    local = os.path.join(path, "config.json")
    if os.path.isfile(local):
        from ..checkpoints import read_json

        return read_json(local)  # a broken file is an error naming it
    if os.path.isdir(path) or os.path.isabs(path) or path.startswith((".", "~")):
        return None  # a local path: never looked up on the Hub
    try:
        config_dict, _ = AutoConfig.get_config_dict(path)
    except Exception:  # noqa: BLE001 - no config: not a model folder the caller can use
        return None
    return config_dict


def is_slime_checkpoint(path: str) -> bool:
    """Whether `path` holds a full SliME model (the package's layout or the authors' `llava_llama` layout)."""
    config_dict = _read_config_dict(path)
    return config_dict is not None and (config_dict.get("model_type") == "slime" or is_original_layout(config_dict))


@contextlib.contextmanager
def _whole_tensors(deepspeed_config: Any | None) -> Iterator[None]:
    """Loads models as whole tensors even under ZeRO-3 (whose partitioned init would leave their state dicts empty):
    the LLM and CLIP are only a source of weights for the SliME model, which is then built (and partitioned)."""
    if deepspeed_config is None or not deepspeed_config.is_zero3():
        yield
        return
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(deepspeed_config)


def initialise_adapters(model: SliMEForConditionalGeneration, seed: int) -> None:
    """
    Draws the vision adapters' initial values from `seed` alone, in a fixed order, whatever building the model drew
    before (a ZeRO-3 build creates and initialises partitioned tensors, an unpartitioned one does not), so the same
    seed gives the same start with and without ZeRO-3.
    """
    inner = model.model
    modules = [getattr(inner, name) for name in ADAPTER_MODULES]
    parameters = [p for module in modules for p in module.parameters()]
    for parameter in parameters:
        parameter._is_hf_initialized = False  # transformers' init functions skip flagged tensors
    context = contextlib.nullcontext()
    if any(hasattr(p, "ds_id") for p in parameters):
        import deepspeed

        context = deepspeed.zero.GatheredParameters(parameters, modifier_rank=0)
    with context, torch.no_grad():
        torch.manual_seed(seed)
        for module in modules:
            for submodule in module.modules():
                model._init_weights(submodule)
    for parameter in parameters:
        parameter._is_hf_initialized = True


def build_from_text_model(
    model_name_or_path: str,
    vision_tower: str,
    dtype: str = "float32",
    attn_implementation: str | None = None,
    deepspeed_config: Any | None = None,
    seed: int | None = None,
) -> tuple[SliMEForConditionalGeneration, SliMEProcessor]:
    """
    A new SliME model from a text LLM (any `AutoModelForCausalLM`) and a CLIP vision tower; the adapters are freshly
    initialised (from `seed` when given, see [`initialise_adapters`]; else from the current random state).

    Args:
        model_name_or_path (`str`): the text LLM (folder or Hub id), with its tokenizer.
        vision_tower (`str`): the CLIP vision tower (folder or Hub id; a full CLIP checkpoint works too).
        dtype (`str`, *optional*, defaults to `"float32"`): weights dtype.
        attn_implementation (`str`, *optional*): attention implementation of the language model.
        deepspeed_config (`HfTrainerDeepSpeedConfig`, *optional*): the run's DeepSpeed config
            (`training_args.hf_deepspeed_config`); under ZeRO-3 the parts are read whole and the SliME model is
            built partitioned.
        seed (`int`, *optional*): draw the adapters' initial values from this seed alone.

    Returns:
        `(model, processor)`.
    """
    processor = SliMEProcessor.from_pretrained(model_name_or_path)
    tokenizer = processor.tokenizer
    torch_dtype = _torch_dtype(dtype)
    load_kwargs = {"dtype": torch_dtype}
    if attn_implementation is not None:
        load_kwargs["attn_implementation"] = attn_implementation
    vision_config, vision_dir = resolve_vision_config(vision_tower)
    with _whole_tensors(deepspeed_config):
        text_model = AutoModelForCausalLM.from_pretrained(model_name_or_path, **load_kwargs)
        # The class SliMEModel builds its tower with (CLIPVisionModel); a vision-only or a full CLIP folder.
        vision_model = MODEL_MAPPING[type(vision_config)].from_pretrained(vision_dir or vision_tower, dtype=torch_dtype)

    text_config = text_model.config
    if text_config.pad_token_id is None:
        text_config.pad_token_id = tokenizer.pad_token_id
    config = SliMEConfig(
        text_config=text_config.to_dict(),
        vision_config=vision_config.to_dict(),
        image_token_id=processor.image_token_id,
        separator_token_id=separator_token_id(processor),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=text_config.bos_token_id,
        eos_token_id=text_config.eos_token_id,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )
    state_dict = {f"model.language_model.{k}": v for k, v in text_model.base_model.state_dict().items()}
    head = text_model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{model_name_or_path} has no output head: SliME needs a causal language model")
    state_dict.update({f"lm_head.{k}": v for k, v in head.state_dict().items()})
    state_dict.update({f"model.vision_tower.{k}": v for k, v in vision_model.state_dict().items()})
    del text_model, vision_model
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the load report would list every adapter weight as missing: they are new
    try:
        model = SliMEForConditionalGeneration.from_pretrained(None, config=config, state_dict=state_dict, **load_kwargs)
    finally:
        logging.set_verbosity(verbosity)
    if seed is not None:
        initialise_adapters(model, seed)
    fresh = [k for k in model.state_dict() if k not in state_dict]
    logger.info(f"built SliME from {model_name_or_path} + {vision_tower}; {len(fresh)} adapter tensors initialised")
    model.name_or_path = model_name_or_path
    return model, processor


def load_adapter_weights_into(
    model: SliMEForConditionalGeneration, weights: dict[str, torch.Tensor], source: str
) -> None:
    """
    Loads adapter weights (package names, e.g. from [`~slime_hf.checkpoints.load_adapter_weights`]) into a model,
    partitioned by ZeRO-3 or not.

    Unknown names and shape mismatches raise a `ValueError`; adapter weights `weights` lacks keep their current values
    and are logged.
    """
    parameters = dict(model.named_parameters())
    unknown = sorted(k for k in weights if k not in parameters)
    if unknown:
        raise ValueError(f"{source} holds weights the model does not have: {unknown[:8]}")
    # ZeRO-3 partitions parameters: their full shape is `ds_shape`.
    shapes = {k: tuple(getattr(p, "ds_shape", p.shape)) for k, p in parameters.items()}
    mismatched = [f"{k}: {tuple(v.shape)} vs {shapes[k]}" for k, v in weights.items() if tuple(v.shape) != shapes[k]]
    if mismatched:
        raise ValueError(f"{source} holds adapter weights of other shapes than the model's: {mismatched[:8]}")
    kept = [k for k in parameters if k.startswith(tuple(f"model.{m}." for m in ADAPTER_MODULES)) and k not in weights]
    if kept:
        logger.warning(
            f"{source} has no values for {len(kept)} adapter weights; they keep their current values: {kept}"
        )
    targets = [parameters[k] for k in weights]
    if any(hasattr(p, "ds_id") for p in targets):
        import deepspeed

        with deepspeed.zero.GatheredParameters(targets, modifier_rank=0):
            if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
                model.load_state_dict(weights, strict=False)
    else:
        model.load_state_dict(weights, strict=False)


def lora_target_modules(model: SliMEForConditionalGeneration, names: list[str] | None = None) -> str:
    """A peft `target_modules` pattern for linear layers of the language model only (never the head or the
    vision side): `names` (e.g. `["q_proj", "v_proj"]`), or every linear layer of the language model."""
    if names is None:
        names = sorted(
            {
                name.rsplit(".", 1)[-1]
                for name, module in model.model.language_model.named_modules()
                if isinstance(module, nn.Linear)
            }
        )
    if not names:
        raise ValueError("no linear layer found in the language model for LoRA")
    return r"^model\.language_model\..*\.(" + "|".join(map(str, names)) + r")$"


def wrap_with_lora(model: SliMEForConditionalGeneration, args: Any) -> Any:
    """Wraps the language model with LoRA (peft); the vision adapters stay fully trainable (stage 3)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=lora_target_modules(model, args.lora_target_module_names),
        bias="none",
    )
    # The LoRA matrices are drawn from the seed itself, not from whatever building the model left in the RNG (a
    # ZeRO-3 build draws differently from an unpartitioned one); the Trainer seeds again before training.
    torch.manual_seed(args.seed)
    peft_model = get_peft_model(model, config)
    for name, parameter in peft_model.named_parameters():
        # Trained weights in float32 when the model is loaded in half precision, as peft does for LoRA's own.
        if ("lora_" in name or is_adapter_parameter(name)) and parameter.dtype in (torch.float16, torch.bfloat16):
            if not name.endswith(".position_table"):
                parameter.data = parameter.data.float()
    freeze_for_stage(peft_model, args.stage, train_language_model=False)
    return peft_model


def build_model_and_processor(model_args: Any, training_args: Any) -> tuple[Any, SliMEProcessor]:
    """
    The model (switched and frozen for the stage, LoRA-wrapped if asked) and processor of a training run.

    Args:
        model_args ([`SliMEModelArguments`]): where the model comes from.
        training_args ([`SliMETrainingArguments`]): the stage and LoRA settings.
    """
    path = model_args.model_name_or_path
    if _read_config_dict(path) is None:
        # Said here, before the text-model branch would call it "a text model" missing --vision_tower.
        if os.path.isdir(path):
            raise ValueError(f"--model_name_or_path {path} has no config.json: not a model folder")
        if os.path.isabs(path) or path.startswith((".", "~")):
            raise ValueError(f"--model_name_or_path {path}: no such folder")
        raise ValueError(
            f"--model_name_or_path {path}: no such folder, and no model of that id on the Hub (or in its cache)"
        )
    if is_slime_checkpoint(path):
        load_kwargs = {"dtype": _torch_dtype(model_args.dtype)}
        if model_args.attn_implementation is not None:
            load_kwargs["attn_implementation"] = model_args.attn_implementation
        model = SliMEForConditionalGeneration.from_pretrained(path, **load_kwargs)
        processor = SliMEProcessor.from_pretrained(path)
        if model_args.vision_tower is not None:
            logger.warning(f"{path} is a full SliME checkpoint: its own vision tower is used, not --vision_tower")
    else:
        if model_args.vision_tower is None:
            raise ValueError(
                f"{path} is a text model: give --vision_tower (CLIP) to build a SliME model from it, or pass a full "
                "SliME checkpoint as --model_name_or_path"
            )
        model, processor = build_from_text_model(
            path,
            model_args.vision_tower,
            model_args.dtype,
            model_args.attn_implementation,
            deepspeed_config=getattr(training_args, "hf_deepspeed_config", None),
            seed=training_args.seed,
        )
    if model_args.pretrained_adapters:
        from ..checkpoints import load_adapter_weights

        weights = load_adapter_weights(model_args.pretrained_adapters)
        load_adapter_weights_into(model, weights, model_args.pretrained_adapters)
    model.config.router_reads_answers = model_args.router_reads_answers
    model.config.training_max_length = training_args.model_max_length
    model.config.gate_noise_uses_noise_weight = model_args.gate_noise_uses_noise_weight
    model.model.global_adapter.noise_uses_noise_weight = model_args.gate_noise_uses_noise_weight
    stage = get_stage(training_args.stage)
    apply_stage_config(model, stage, model_args.router_top_p)
    if training_args.lora_enable:
        return wrap_with_lora(model, training_args), processor
    freeze_for_stage(model, stage)
    return model, processor


__all__ = [
    "build_from_text_model",
    "build_model_and_processor",
    "initialise_adapters",
    "is_slime_checkpoint",
    "load_adapter_weights_into",
    "lora_target_modules",
    "separator_token_id",
    "wrap_with_lora",
]
