"""The SliME training stages: which parameters train and which image tokens the language model sees.

The authors trained in four runs: 1a the global MLP expert, 1b the global attention
expert, 2 the local compressor (each on captions with the `plain` template), then 3 everything but the vision tower
with the chat template. A preset fixes the config switches of its stage and exactly the trainable parameters; every
other parameter is frozen (no gradient, no optimizer state).

Deliberate differences from the original's `requires_grad` flags (which its forward then ignored): the sin-cos
position tables never train (the original detaches them), the gate's noise weight never trains (the original never
uses it), and the gate weight trains only where the mixture is used (stage 3).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn


ADAPTER_MODULES = ("projector", "global_adapter", "local_compressor")
# Parameters that never train: the vision tower, the resamplers' position tables and the gate's unused noise weight.
_NEVER_TRAINED = re.compile(r"(^|\.)vision_tower\.|\.position_table$|\.gate_noise_weight$")
# Wrappers (DDP, FSDP, activation checkpointing, peft) prefix parameter names; the package name follows them.
_WRAPPER_PREFIX = re.compile(
    r"^(?:.*?\.)?(?=model\.(?:projector|global_adapter|local_compressor|language_model|"
    r"vision_tower)\.|lm_head\.)"
)


@dataclass(frozen=True)
class StagePreset:
    """
    What one SliME training stage trains and how the model is switched for it.

    Args:
        name (`str`): `"1a"`, `"1b"`, `"2"` or `"3"`.
        description (`str`): one line for logs and model cards.
        config (`dict`): [`SliMEConfig`] switches of the stage (`global_adapter_mode`, `use_global_only`,
            `use_local_only`, `router_top_p`).
        trains (`tuple[str, ...]`): regular expressions; a parameter (package name) trains when one matches and it
            is not in the never-trained set (vision tower, position tables, gate noise weight).
        saves_full_model (`bool`): stage 3 saves a full model folder, stages 1-2 the adapter weights only.
        default_template (`str`, *optional*): the data template of the stage (`None`: the checkpoint's chat
            template).
    """

    name: str
    description: str
    config: dict = field(default_factory=dict)
    trains: tuple[str, ...] = ()
    saves_full_model: bool = False
    default_template: str | None = "plain"

    def is_trained(self, name: str) -> bool:
        """Whether the parameter `name` (package name, wrapper prefixes allowed) trains in this stage."""
        name = package_parameter_name(name)
        if _NEVER_TRAINED.search(name):
            return False
        return any(re.match(pattern, name) for pattern in self.trains)


STAGES: dict[str, StagePreset] = {
    "1a": StagePreset(
        name="1a",
        description="global view, MLP expert (captions, plain template)",
        config={"global_adapter_mode": "mlp", "use_global_only": True, "use_local_only": False, "router_top_p": 1.0},
        trains=(r"model\.projector\.",),
    ),
    "1b": StagePreset(
        name="1b",
        description="global view, attention expert (captions, plain template)",
        config={
            "global_adapter_mode": "attention",
            "use_global_only": True,
            "use_local_only": False,
            "router_top_p": 1.0,
        },
        trains=(r"model\.global_adapter\.attention_expert\.",),
    ),
    "2": StagePreset(
        name="2",
        description="local compressor, router top-p 1.0 (captions, plain template)",
        config={
            "global_adapter_mode": "mixture",
            "use_global_only": False,
            "use_local_only": True,
            "router_top_p": 1.0,
        },
        trains=(r"model\.local_compressor\.",),
    ),
    "3": StagePreset(
        name="3",
        description="full fine-tune: LLM, global adapter with gate, local compressor (chat template)",
        config={
            "global_adapter_mode": "mixture",
            "use_global_only": False,
            "use_local_only": False,
            "router_top_p": 0.95,
        },
        trains=(r"model\.(projector|global_adapter|local_compressor|language_model)\.", r"lm_head\."),
        saves_full_model=True,
        default_template=None,
    ),
}


def get_stage(stage: str | StagePreset) -> StagePreset:
    """The preset of a stage name (`"1a"`, `"1b"`, `"2"`, `"3"`)."""
    if isinstance(stage, StagePreset):
        return stage
    if str(stage) not in STAGES:
        raise ValueError(f"unknown SliME training stage {stage!r}; choose one of {sorted(STAGES)}")
    return STAGES[str(stage)]


def package_parameter_name(name: str) -> str:
    """A parameter name with wrapper prefixes (`module.`, `_fsdp_wrapped_module.`, `base_model.model.`, ...)
    removed, as in the state dict of [`SliMEForConditionalGeneration`]."""
    name = name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")
    return _WRAPPER_PREFIX.sub("", name, count=1)


def is_adapter_parameter(name: str) -> bool:
    """Whether a parameter belongs to the vision adapters (projector, global adapter, local compressor)."""
    return package_parameter_name(name).startswith(tuple(f"model.{m}." for m in ADAPTER_MODULES))


def apply_stage_config(model: nn.Module, stage: str | StagePreset, router_top_p: float | None = None) -> None:
    """
    Switches a SliME model to a stage: config fields (saved with the model) and the modules that read them at
    construction.

    Args:
        model ([`SliMEForConditionalGeneration`]): the model (not wrapped).
        stage (`str` or [`StagePreset`]): the stage.
        router_top_p (`float`, *optional*): overrides the stage's router top-p (stage 3: 0.95, the release value).
    """
    preset = get_stage(stage)
    switches = dict(preset.config)
    if router_top_p is not None:
        switches["router_top_p"] = float(router_top_p)
    config = model.config
    if switches["use_global_only"] and switches["use_local_only"]:
        raise ValueError("a stage cannot use both use_global_only and use_local_only")
    if not 0.0 < switches["router_top_p"] <= 1.0:
        raise ValueError(f"router_top_p must be in (0, 1], got {switches['router_top_p']}")
    for key, value in switches.items():
        setattr(config, key, value)
    inner = model.model if hasattr(model, "model") else model
    inner.global_adapter.mode = switches["global_adapter_mode"]


def freeze_for_stage(model: nn.Module, stage: str | StagePreset, train_language_model: bool = True) -> list[str]:
    """
    Sets `requires_grad` exactly for a stage: the stage's parameters train, every other one is frozen.

    Args:
        model (`nn.Module`): a SliME model, possibly wrapped by peft.
        stage (`str` or [`StagePreset`]): the stage.
        train_language_model (`bool`, *optional*, defaults to `True`): `False` keeps the language model and the head
            frozen in stage 3 (LoRA trains them through its own parameters, which this function leaves alone).

    Returns:
        `list[str]`: names of the trainable parameters (as `model.named_parameters()` gives them).
    """
    preset = get_stage(stage)
    trainable = []
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            trainable.append(name)
            continue
        train = preset.is_trained(name)
        if train and not train_language_model and not is_adapter_parameter(name):
            train = False
        parameter.requires_grad_(train)
        if train:
            trainable.append(name)
    if not trainable:
        raise ValueError(f"stage {preset.name} found no parameter to train in {type(model).__name__}")
    return trainable


def prepare_model_for_stage(model: nn.Module, stage: str | StagePreset, router_top_p: float | None = None) -> list[str]:
    """
    [`apply_stage_config`] then [`freeze_for_stage`] on a (not wrapped) SliME model.

    Returns:
        `list[str]`: names of the trainable parameters.
    """
    apply_stage_config(model, stage, router_top_p)
    return freeze_for_stage(model, stage)


__all__ = [
    "ADAPTER_MODULES",
    "STAGES",
    "StagePreset",
    "apply_stage_config",
    "freeze_for_stage",
    "get_stage",
    "is_adapter_parameter",
    "package_parameter_name",
    "prepare_model_for_stage",
]
