"""Reading SliME checkpoints in every layout: the authors' full checkpoints, LoRA releases and stage-1/2 adapter
files, and the package's stage checkpoints and LoRA outputs.

This module is the one home of the authors' layout: the table of their weight names and its side rules (dropped
buffers, the CLIP prefix), the translation of their `config.json` (misspelled `seperator` included), the separator
rule, and the one reader of weight shards. [`SliMEForConditionalGeneration.from_pretrained`] hands a folder in the
authors' layout to [`load_original_model`]; a saved or converted folder never takes that path. Pickled `.bin` files
are read with `torch.load(weights_only=True)` (memory-mapped where the file allows it), so no code from a checkpoint
is ever executed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass
from typing import Any

import torch
from transformers import CLIPVisionConfig

from .configuration_slime import CLIP_VIT_L_336, SliMEConfig


logger = logging.getLogger(__name__)

ADAPTER_WEIGHTS_NAME = "slime_adapters.safetensors"
ADAPTER_PREFIXES = ("model.projector.", "model.global_adapter.", "model.local_compressor.")
VISION_TOWER_PREFIX = "model.vision_tower."
# A CLIP checkpoint's (and `CLIPVisionModel`'s) vision weights, full CLIP or vision-only.
CLIP_VISION_PREFIX = "vision_model."
# Names of the state dict of `SliMEForConditionalGeneration` (as saved: the vision tower under `vision_model.`).
PACKAGE_PREFIXES = (VISION_TOWER_PREFIX, "model.language_model.", "lm_head.") + ADAPTER_PREFIXES
CHECKPOINT_KINDS = ("full", "lora", "adapters", "stage")

# The authors' stage-1/2 adapter files (llava/train/train.py, llava_trainer.py).
ORIGINAL_ADAPTER_FILES = ("mm_projector.bin", "sampler.bin")
NON_LORA_TRAINABLES_FILES = ("non_lora_trainables.safetensors", "non_lora_trainables.bin")
LORA_CONFIG_NAME = "adapter_config.json"
LORA_WEIGHTS_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
WEIGHT_INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
WEIGHT_FILE_NAMES = ("model.safetensors", "pytorch_model.bin")
# peft's prefix in front of the wrapped model's own names.
PEFT_PREFIX = "base_model.model."
# Which package module each adapter name belongs to, for messages ("the global adapter is missing").
ADAPTER_PARTS = {
    "model.projector.": "projector (MLP expert, `mm_projector.projection`)",
    "model.global_adapter.": "global adapter (gate and attention expert, `mm_projector.w_gate`/`attn`)",
    "model.local_compressor.": "local compressor (`sampler.post_qformer`)",
}

# safetensors' dtype codes.
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


# ----------------------------------------------------------------------------------------------------------------
# The ONE table of the authors' weight names (llava_llama layout) -> package names. Read at load time, never written.
# ----------------------------------------------------------------------------------------------------------------
_RESAMPLER_PARTS = {
    "query": "queries",
    "pos_embed": "position_table",
    "attn.in_proj_weight": "attn.in_proj_weight",
    "attn.in_proj_bias": "attn.in_proj_bias",
    "attn.out_proj.weight": "attn.out_proj.weight",
    "attn.out_proj.bias": "attn.out_proj.bias",
    "ln_q.weight": "norm_queries.weight",
    "ln_q.bias": "norm_queries.bias",
    "ln_kv.weight": "norm_inputs.weight",
    "ln_kv.bias": "norm_inputs.bias",
    "ln_post.weight": "norm_output.weight",
    "ln_post.bias": "norm_output.bias",
}
ORIGINAL_TO_PACKAGE_NAMES: dict[str, str] = {
    "model.mm_projector.projection.0.weight": "model.projector.linear_1.weight",
    "model.mm_projector.projection.0.bias": "model.projector.linear_1.bias",
    "model.mm_projector.projection.2.weight": "model.projector.linear_2.weight",
    "model.mm_projector.projection.2.bias": "model.projector.linear_2.bias",
    "model.mm_projector.w_gate": "model.global_adapter.gate_weight",
    "model.mm_projector.w_noise": "model.global_adapter.gate_noise_weight",
    **{
        f"model.mm_projector.attn.{k}": f"model.global_adapter.attention_expert.{v}"
        for k, v in _RESAMPLER_PARTS.items()
    },
    **{f"model.sampler.post_qformer.{k}": f"model.local_compressor.{v}" for k, v in _RESAMPLER_PARTS.items()},
}
ORIGINAL_TO_PACKAGE_PREFIXES: tuple[tuple[str, str], ...] = (
    # The authors' CLIP wrapper holds a `CLIPVisionModel` as `vision_tower`: its names continue with `vision_model.`.
    ("model.vision_tower.vision_tower.", VISION_TOWER_PREFIX),
    ("model.embed_tokens.", "model.language_model.embed_tokens."),
    ("model.layers.", "model.language_model.layers."),
    ("model.norm.", "model.language_model.norm."),
    ("lm_head.", "lm_head."),
)
# Tensors deliberately dropped, in every layout: the original's dead gate buffers (only used by discarded
# load-balancing code), and the non-persistent buffers older transformers versions saved (CLIP's position ids,
# Llama's rotary inverse frequencies).
DROPPED_NAMES = re.compile(r"^model\.mm_projector\.(mean|std)$|(^|\.)embeddings\.position_ids$|\.rotary_emb\.inv_freq$")


# ----------------------------------------------------------------------------------------------------------------
# Names
# ----------------------------------------------------------------------------------------------------------------
def rename_original_key(key: str) -> str | None:
    """
    Maps one weight name of the authors' `llava_llama` layout to the package's name.

    Args:
        key (`str`): a full name of a `LlavaLlamaForCausalLM` state dict (`model.*`, `lm_head.*`), without peft's
            `base_model.model.` prefix.

    Returns:
        `str` or `None`: the package name; `None` for a tensor deliberately dropped (`DROPPED_NAMES`).

    Raises:
        `KeyError`: a name the table does not know.
    """
    if DROPPED_NAMES.search(key):
        return None
    if key in ORIGINAL_TO_PACKAGE_NAMES:
        return ORIGINAL_TO_PACKAGE_NAMES[key]
    for old, new in ORIGINAL_TO_PACKAGE_PREFIXES:
        if key.startswith(old):
            return new + key[len(old) :]
    raise KeyError(f"unknown weight name in the authors' layout: {key!r}")


def rename_original_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Renames a whole state dict of the authors' layout with [`rename_original_key`], dropping the dead buffers."""
    renamed = {}
    for key, tensor in state_dict.items():
        new_key = rename_original_key(key)
        if new_key is not None:
            renamed[new_key] = tensor
    return renamed


def to_package_name(key: str) -> str | None:
    """
    The package's name of one weight name of any SliME layout.

    Names of the authors' layout (and of a plain Llama checkpoint: `model.layers.*`, `lm_head.*`) are renamed with
    [`rename_original_key`]; names already in the package's layout pass through. `None` means the tensor is
    deliberately dropped (the original's dead `mean`/`std` buffers, stale position-id and rotary buffers).

    Args:
        key (`str`): a weight name, without any peft prefix.

    Returns:
        `str` or `None`: the package name.

    Raises:
        `KeyError`: the name belongs to no known layout.
    """
    try:
        return rename_original_key(key)
    except KeyError:
        if key.startswith(PACKAGE_PREFIXES):
            return key
        raise


def vision_tower_name(key: str) -> str | None:
    """
    The package's name of one weight of a CLIP checkpoint (full CLIP or vision-only, as `CLIPVisionModel` names
    them), or `None` for the text half of a full CLIP and the dropped position-id buffer.
    """
    if not key.startswith(CLIP_VISION_PREFIX) or DROPPED_NAMES.search(key):
        return None
    return VISION_TOWER_PREFIX + key


def in_memory_name(name: str) -> str:
    """A package name as `SliMEForConditionalGeneration.state_dict()` has it in memory: transformers saves the
    vision tower's weights under `vision_model.` and strips that prefix when it loads them."""
    return name.replace(VISION_TOWER_PREFIX + CLIP_VISION_PREFIX, VISION_TOWER_PREFIX, 1)


def strip_peft_prefix(key: str) -> str:
    """Drops peft's `base_model.model.` in front of a wrapped model's weight name."""
    return key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key


def adapter_parts(state_dict: dict[str, torch.Tensor]) -> list[str]:
    """The adapter modules (keys of `ADAPTER_PARTS`, e.g. `"model.local_compressor."`) a state dict holds weights of."""
    return [prefix for prefix in ADAPTER_PREFIXES if any(k.startswith(prefix) for k in state_dict)]


def _rename_all(
    tensors: dict[str, torch.Tensor], source: str, allowed: tuple[str, ...], what: str = "SliME adapter weights"
) -> dict[str, torch.Tensor]:
    """Renames a small state dict strictly: unknown names, and names outside `allowed`, are a ValueError."""
    renamed, unknown = {}, []
    for key, tensor in tensors.items():
        try:
            new_key = to_package_name(strip_peft_prefix(key))
        except KeyError:
            unknown.append(key)
            continue
        if new_key is None:
            continue
        if not new_key.startswith(allowed):
            unknown.append(key)
            continue
        renamed[new_key] = tensor
    if unknown:
        raise ValueError(
            f"{source} holds weights that are not {what} ({len(unknown)}): {sorted(unknown)[:12]}"
            + (" ..." if len(unknown) > 12 else "")
        )
    return renamed


# ----------------------------------------------------------------------------------------------------------------
# Config of the authors' layout -> SliMEConfig
# ----------------------------------------------------------------------------------------------------------------
KNOWN_VISION_TOWERS = {
    "openai/clip-vit-large-patch14-336": CLIP_VIT_L_336,
}
# Fields of `config.json` that describe a file rather than the model.
CONFIG_BOOKKEEPING_FIELDS = (
    "architectures",
    "model_type",
    "_name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
)
# The multimodal, training and bookkeeping fields of the authors' `config.json`; every other field is the language
# model's.
ORIGINAL_MM_FIELDS = (
    "mm_vision_tower",
    "mm_hidden_size",
    "mm_vision_select_layer",
    "mm_vision_select_feature",
    "mm_projector_type",
    "mm_learnable_gated",
    "mm_resampler_type",
    "mm_resampler_dim",
    "mm_resampler_topp",
    "mm_resampler_temp",
    "seperator",
    "use_global_only",
    "use_local_only",
    "mm_patch_merge_type",
    "image_aspect_ratio",
    "image_grid_pinpoints",
    "tokenizer_padding_side",
    "tokenizer_model_max_length",
    "use_mm_proj",
    "tune_mm_mlp_adapter",
    "freeze_mm_mlp_adapter",
    "mm_use_im_start_end",
    "mm_use_im_patch_token",
    "mm_projector_lr",
    *CONFIG_BOOKKEEPING_FIELDS,
    "vision_tower",
    "mm_vision_tower_lr",
    "unfreeze_mm_vision_tower",
)
# The authors' field -> (`SliMEConfig` field, the original's default). `seperator` is the original's spelling.
ORIGINAL_CONFIG_NAMES = {
    "mm_vision_select_layer": ("vision_feature_layer", -2),
    "mm_resampler_dim": ("local_compressor_num_queries", 144),
    "mm_resampler_topp": ("router_top_p", 0.95),
    "mm_resampler_temp": ("router_temperature", 1.0),
    "seperator": ("separator_token_id", 1919),
}
# Settings the releases never change: any other value is a model this package does not implement.
ORIGINAL_FIXED_FIELDS = {
    "mm_projector_type": "gated",
    "mm_resampler_type": "cosine",
    "mm_patch_merge_type": "spatial",
    "mm_vision_select_feature": "patch",
    "image_aspect_ratio": "anyres",
}
_GATED_MODES = {-1: "mixture", 0: "mlp", 1: "attention"}


def is_original_layout(config_dict: dict) -> bool:
    """Whether a `config.json` dict is the authors' `llava_llama` layout."""
    return config_dict.get("model_type") == "llava_llama" or "mm_vision_tower" in config_dict


def separator_token_id(processor: Any) -> int:
    """
    The separator id the original sets: the last id of `tokenizer(',')` (stored under the misspelled `seperator`).

    Args:
        processor ([`SliMEProcessor`]): the model's processor; its exact tokenization of `","` is used.
    """
    return processor.tokenize_prompt(",")[-1]


def resolve_vision_config(vision_tower: str, checkpoint_dir: str | None = None) -> tuple[CLIPVisionConfig, str | None]:
    """
    Resolves `mm_vision_tower` to a CLIP vision config and, when local, the directory holding its weights.

    Order: a local directory (absolute, or relative to the checkpoint's directory), the known OpenAI CLIP ids
    (built-in configs; the CLIP weights are inside every release), then the Hub.

    Raises:
        `ValueError`: none of these resolves.
    """
    candidates = [vision_tower]
    if checkpoint_dir is not None and not os.path.isabs(vision_tower):
        candidates.insert(0, os.path.join(checkpoint_dir, vision_tower))
    for candidate in candidates:
        if os.path.isdir(candidate):
            return CLIPVisionConfig.from_pretrained(candidate), candidate
    if vision_tower in KNOWN_VISION_TOWERS:
        return CLIPVisionConfig(**KNOWN_VISION_TOWERS[vision_tower]), None
    try:
        return CLIPVisionConfig.from_pretrained(vision_tower), None
    except Exception as error:  # noqa: BLE001 - re-raised with the context a user needs
        raise ValueError(
            f"cannot resolve the vision tower {vision_tower!r}: not a local directory (also tried relative to "
            f"{checkpoint_dir!r}), not a known CLIP id ({sorted(KNOWN_VISION_TOWERS)}), and the Hub failed: {error}"
        ) from error


def _check_original_fields(config_dict: dict) -> None:
    for name, allowed in ORIGINAL_FIXED_FIELDS.items():
        value = config_dict.get(name, allowed)
        if value != allowed:
            raise ValueError(f"this checkpoint has {name}={value!r}; SliME releases use {allowed!r}")
    if config_dict.get("mm_use_im_start_end"):
        raise ValueError("this checkpoint uses mm_use_im_start_end=True, which SliME releases never do")


def config_from_original(
    config_dict: dict,
    checkpoint_dir: str | None = None,
    vision_tower: str | None = None,
    separator_token_id: int | None = None,
) -> tuple[SliMEConfig, str | None]:
    """
    Translates a `llava_llama` config dict of the authors' code into a [`SliMEConfig`].

    Args:
        config_dict (`dict`): the authors' `config.json`, or a language model's config with the authors'
            multimodal fields (`ORIGINAL_MM_FIELDS`) added.
        checkpoint_dir (`str`, *optional*): where a relative `mm_vision_tower` is looked up first.
        vision_tower (`str`, *optional*): replaces the config's `mm_vision_tower` (a CLIP folder or id).
        separator_token_id (`int`, *optional*): used where the config has no `seperator`.

    Returns:
        `(SliMEConfig, str | None)`: the config and the local vision tower directory (if the vision tower resolved
        to one).

    Raises:
        `ValueError`: settings SliME releases never use, no vision tower, or a mismatched `mm_hidden_size`.
    """
    _check_original_fields(config_dict)
    vision_tower = vision_tower or config_dict.get("mm_vision_tower")
    if vision_tower is None:
        raise ValueError("this config has no `mm_vision_tower`: it is not a SliME checkpoint in the authors' layout")
    vision_config, vision_dir = resolve_vision_config(vision_tower, checkpoint_dir)
    if config_dict.get("mm_hidden_size", vision_config.hidden_size) != vision_config.hidden_size:
        raise ValueError(
            f"mm_hidden_size={config_dict['mm_hidden_size']} does not match the vision tower's hidden size "
            f"{vision_config.hidden_size}"
        )
    text_fields = {k: v for k, v in config_dict.items() if k not in ORIGINAL_MM_FIELDS}
    text_fields.pop("pad_token_id", None)
    text_config = {"model_type": "llama", **text_fields, "pad_token_id": config_dict.get("pad_token_id")}
    gated = int(config_dict.get("mm_learnable_gated", -1))
    if gated not in _GATED_MODES:
        raise ValueError(f"mm_learnable_gated must be -1, 0 or 1, got {gated}")
    fields = {new: config_dict.get(old, default) for old, (new, default) in ORIGINAL_CONFIG_NAMES.items()}
    if "seperator" not in config_dict and separator_token_id is not None:
        fields["separator_token_id"] = separator_token_id
    if "image_grid_pinpoints" in config_dict:
        fields["image_grid_pinpoints"] = config_dict["image_grid_pinpoints"]
    config = SliMEConfig(
        text_config=text_config,
        vision_config=vision_config.to_dict(),
        image_token_id=config_dict["vocab_size"],
        global_adapter_mode=_GATED_MODES[gated],
        position_table_dtype="float16",
        use_global_only=bool(config_dict.get("use_global_only", False)),
        use_local_only=bool(config_dict.get("use_local_only", False)),
        tie_word_embeddings=config_dict.get("tie_word_embeddings", False),
        pad_token_id=config_dict.get("pad_token_id"),
        bos_token_id=config_dict.get("bos_token_id"),
        eos_token_id=config_dict.get("eos_token_id"),
        **fields,
    )
    return config, vision_dir


# ----------------------------------------------------------------------------------------------------------------
# Weight files
# ----------------------------------------------------------------------------------------------------------------
def read_json(path: str | os.PathLike) -> dict:
    """A JSON file as a dict, with a `ValueError` that names the file when it is not valid JSON."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error


def _torch_load(path: str) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as error:
        if "mmap" not in str(error):
            raise
        # Files written with the legacy (non-zip) serialisation cannot be memory-mapped.
        return torch.load(path, map_location="cpu", weights_only=True)


class WeightFile:
    """
    Lazy, read-only access to one weight file (`.safetensors`, or a `torch.save` pickle read with
    `weights_only=True`): names, shapes and dtypes without loading the tensors, then one tensor at a time.

    Args:
        path (`str` or `os.PathLike`): the file.

    Raises:
        `ValueError`: the file is missing, truncated or not a weight file.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        if not os.path.isfile(self.path):
            raise ValueError(f"weight file {self.path} does not exist")
        self._handle = None
        self._tensors: dict[str, torch.Tensor] | None = None
        try:
            if self.path.endswith(".safetensors"):
                from safetensors import safe_open

                self._handle = safe_open(self.path, framework="pt")
                self._keys = list(self._handle.keys())
            else:
                tensors = _torch_load(self.path)
                if not isinstance(tensors, dict) or not all(torch.is_tensor(v) for v in tensors.values()):
                    raise ValueError("not a dict of tensors")
                self._tensors = tensors
                self._keys = list(tensors)
        except Exception as error:  # noqa: BLE001 - every reader error becomes one clear message
            raise ValueError(f"cannot read weight file {self.path} (truncated or corrupt?): {error}") from error

    def keys(self) -> list[str]:
        """The tensor names, in file order."""
        return list(self._keys)

    def shape(self, key: str) -> tuple[int, ...]:
        """The shape of one tensor, without loading it."""
        if self._handle is not None:
            return tuple(self._handle.get_slice(key).get_shape())
        return tuple(self._tensors[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        """The dtype of one tensor, without loading it."""
        if self._handle is not None:
            return SAFETENSORS_DTYPES[self._handle.get_slice(key).get_dtype()]
        return self._tensors[key].dtype

    def get(self, key: str) -> torch.Tensor:
        """Loads one tensor."""
        try:
            if self._handle is not None:
                return self._handle.get_tensor(key)
            return self._tensors[key]
        except Exception as error:  # noqa: BLE001
            raise ValueError(f"cannot read {key!r} from {self.path} (truncated or corrupt?): {error}") from error

    def read_all(self) -> dict[str, torch.Tensor]:
        """Every tensor of the file (for small files such as adapters)."""
        return {key: self.get(key) for key in self._keys}

    def close(self) -> None:
        """Releases the file (and its memory map)."""
        self._handle = None
        self._tensors = None

    def __enter__(self) -> "WeightFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def checkpoint_weight_files(folder: str | os.PathLike) -> list[str]:
    """
    The weight files of a checkpoint folder, in index order: the shards listed by `model.safetensors.index.json`
    (or `pytorch_model.bin.index.json`), else `model.safetensors` / `pytorch_model.bin`. Safetensors are preferred
    when both are present.

    Raises:
        `ValueError`: no weights, or a shard listed in the index is missing.
    """
    folder = str(folder)
    for index_name in WEIGHT_INDEX_NAMES:
        index_path = os.path.join(folder, index_name)
        if os.path.isfile(index_path):
            weight_map = read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{index_path} has no weight_map")
            shards = list(dict.fromkeys(weight_map.values()))
            missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
            if missing:
                raise ValueError(
                    f"weight shard(s) {missing} listed in {index_name} are missing from {folder} (incomplete download?)"
                )
            return [os.path.join(folder, s) for s in shards]
    for name in WEIGHT_FILE_NAMES:
        if os.path.isfile(os.path.join(folder, name)):
            return [os.path.join(folder, name)]
    raise ValueError(f"no model weights (model*.safetensors or pytorch_model*.bin) in {folder}")


def _has_model_weights(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, n)) for n in WEIGHT_INDEX_NAMES + WEIGHT_FILE_NAMES)


def _checkpoint_keys(folder: str) -> list[str]:
    """Weight names of a checkpoint, from its index when there is one (no shard is opened)."""
    for index_name in WEIGHT_INDEX_NAMES:
        index_path = os.path.join(folder, index_name)
        if os.path.isfile(index_path):
            return list(read_json(index_path).get("weight_map", {}))
    keys = []
    for path in checkpoint_weight_files(folder):
        with WeightFile(path) as weights:
            keys.extend(weights.keys())
    return keys


def _is_slime_config(config_dict: dict) -> bool:
    return config_dict.get("model_type") == SliMEConfig.model_type or is_original_layout(config_dict)


def read_slime_config(folder: str | os.PathLike) -> dict:
    """
    The `config.json` of a local SliME model folder (the package's layout or the authors'), checked before a model is
    loaded from it, so that entry points report a bad folder by its path.

    Raises:
        `ValueError`: the folder does not exist, has no `config.json`, the file is not valid JSON, or its
        `model_type` is not SliME's (`slime`, or the authors' `llava_llama` with `mm_vision_tower`).
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise ValueError(f"model folder not found: {folder}")
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{folder} has no config.json: not a model folder")
    config_dict = read_json(path)
    if not isinstance(config_dict, dict) or not _is_slime_config(config_dict):
        model_type = config_dict.get("model_type") if isinstance(config_dict, dict) else None
        raise ValueError(
            f"{path} is a config of model_type {model_type!r}, not a SliME model (expected 'slime', or the authors' "
            "'llava_llama' with mm_vision_tower)"
        )
    return config_dict


def _check_slime_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{folder} has model weights but no config.json")
    config_dict = read_json(path)
    if not _is_slime_config(config_dict):
        model_type = config_dict.get("model_type")
        hint = " (a plain language model: pass it as --base)" if "vocab_size" in config_dict else ""
        raise ValueError(
            f"{path} is a config of model_type {model_type!r}, not a SliME checkpoint (expected model_type "
            f"'llava_llama' with mm_vision_tower, or 'slime'){hint}"
        )
    return config_dict


# ----------------------------------------------------------------------------------------------------------------
# Loading a full checkpoint in the authors' layout
# ----------------------------------------------------------------------------------------------------------------
def load_original_state_dict(checkpoint_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """
    Reads every weight shard of a checkpoint in the authors' layout, in package names.

    Raises:
        `ValueError`: no weights, a missing or unreadable shard, or names of no SliME layout (listed).
    """
    state_dict: dict[str, torch.Tensor] = {}
    for path in checkpoint_weight_files(checkpoint_dir):
        with WeightFile(path) as weights:
            state_dict.update(_rename_all(weights.read_all(), path, PACKAGE_PREFIXES, what="weights of a SliME model"))
    return state_dict


def load_vision_tower_weights(vision_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Reads a local CLIP checkpoint (full CLIP or vision-only) as `model.vision_tower.*` weights."""
    state_dict: dict[str, torch.Tensor] = {}
    for path in checkpoint_weight_files(vision_dir):
        with WeightFile(path) as weights:
            for key in weights.keys():
                name = vision_tower_name(key)
                if name is not None:
                    state_dict[name] = weights.get(key)
    if not state_dict:
        raise ValueError(f"{vision_dir} holds no CLIP vision weights (names starting with {CLIP_VISION_PREFIX!r})")
    return state_dict


def load_original_model(model_class: type, folder: str | os.PathLike, *model_args, **kwargs) -> Any:
    """
    Loads a full checkpoint in the authors' `llava_llama` layout as `model_class` (a
    [`SliMEForConditionalGeneration`], of the package or of a saved repo's code): config translated, weights
    renamed; the CLIP weights are taken from inside the checkpoint, else from the resolved `mm_vision_tower`.

    Args:
        model_class (`type`): the class to build (its `from_pretrained(None, config=..., state_dict=...)` is used).
        folder (`str` or `os.PathLike`): the checkpoint folder.
        model_args, kwargs: passed on to `from_pretrained` (`dtype`, `device_map`, `attn_implementation`, ...).

    Raises:
        `ValueError`: the folder is not a SliME checkpoint, or its weights or vision tower cannot be read.
    """
    folder = os.fspath(folder)
    config_dict = read_slime_config(folder)
    if not is_original_layout(config_dict):
        raise ValueError(f"{folder} is a saved SliME model, not a checkpoint in the authors' layout")
    config, vision_dir = config_from_original(config_dict, folder)
    state_dict = load_original_state_dict(folder)
    if not any(k.startswith(VISION_TOWER_PREFIX) for k in state_dict):
        if vision_dir is None:
            raise ValueError(
                f"{folder} holds no vision tower weights and its mm_vision_tower is not a local directory; convert "
                "it with --vision-tower"
            )
        state_dict.update(load_vision_tower_weights(vision_dir))
    kwargs.pop("trust_remote_code", None)
    if "attn_implementation" in kwargs:
        config._attn_implementation = kwargs["attn_implementation"]
    model = model_class.from_pretrained(None, *model_args, config=config, state_dict=state_dict, **kwargs)
    model.name_or_path = folder
    return model


# ----------------------------------------------------------------------------------------------------------------
# Kinds
# ----------------------------------------------------------------------------------------------------------------
def detect_checkpoint_kind(path: str | os.PathLike) -> str:
    """
    What a SliME checkpoint folder (or adapter file) holds, decided from its files and weight names, never from its
    name.

    Args:
        path (`str` or `os.PathLike`): a folder, or a single adapter `.bin` file.

    Returns:
        `str`: one of
        - `"full"`: a complete model (the authors' `llava_llama` layout or the package's), weights in shards;
        - `"lora"`: a LoRA fine-tune (`adapter_config.json` + `adapter_model.*`, usually `non_lora_trainables.*`);
        - `"adapters"`: the authors' stage-1/2 adapter files (`mm_projector.bin` and/or `sampler.bin`, or one such
          file), including a trainer `checkpoint-N/` whose `mm_projector.bin` holds sampler weights;
        - `"stage"`: the package's stage checkpoint (`config.json` + `slime_adapters.safetensors`).

    Raises:
        `ValueError`: the path holds none of these (with what was found), or a config of another model type.
    """
    path = str(path)
    if os.path.isfile(path):
        if path.endswith(ADAPTER_WEIGHTS_NAME):
            return "stage"
        with WeightFile(path) as weights:
            _rename_all({k: torch.empty(0) for k in weights.keys()}, path, ADAPTER_PREFIXES)
        return "adapters"
    if not os.path.isdir(path):
        raise ValueError(f"{path} is neither a folder nor a file")
    files = set(os.listdir(path))
    if LORA_CONFIG_NAME in files:
        if not files.intersection(LORA_WEIGHTS_NAMES):
            raise ValueError(
                f"{path} has {LORA_CONFIG_NAME} but no adapter weights ({' or '.join(LORA_WEIGHTS_NAMES)})"
            )
        if "config.json" in files:
            _check_slime_config(path)
        return "lora"
    if ADAPTER_WEIGHTS_NAME in files:
        return "stage"
    if _has_model_weights(path):
        _check_slime_config(path)
        keys = _checkpoint_keys(path)
        if any(_is_language_model_name(k) for k in keys):
            return "full"
        if keys and all(_is_adapter_name(k) for k in keys):
            return "adapters"
        raise ValueError(f"{path} has model weights but no language model layers: {sorted(keys)[:8]} ...")
    if files.intersection(ORIGINAL_ADAPTER_FILES):
        return "adapters"
    raise ValueError(
        f"{path} is not a SliME checkpoint: expected model weights + config.json (full), {LORA_CONFIG_NAME} (LoRA), "
        f"{ADAPTER_WEIGHTS_NAME} (stage checkpoint) or {' / '.join(ORIGINAL_ADAPTER_FILES)} (adapters); found "
        f"{sorted(files)[:20]}"
    )


def _is_language_model_name(key: str) -> bool:
    try:
        name = to_package_name(key)
    except KeyError:
        return False
    return name is not None and name.startswith("model.language_model.")


def _is_adapter_name(key: str) -> bool:
    try:
        name = to_package_name(key)
    except KeyError:
        return False
    return name is None or name.startswith(ADAPTER_PREFIXES)


# ----------------------------------------------------------------------------------------------------------------
# Adapter weights (stage checkpoints and the authors' adapter files)
# ----------------------------------------------------------------------------------------------------------------
def save_adapter_weights(state_dict: dict[str, torch.Tensor], folder: str | os.PathLike, config: SliMEConfig) -> None:
    """
    Writes a stage checkpoint: `config.json` (the full [`SliMEConfig`]) and `slime_adapters.safetensors` with the
    adapter weights of `state_dict` (keys under `ADAPTER_PREFIXES`, package names; everything else is left out). The
    resamplers' position tables are stored in `config.position_table_dtype` (float16).

    Args:
        state_dict (`dict[str, torch.Tensor]`): e.g. `model.state_dict()` of a [`SliMEForConditionalGeneration`].
        folder (`str` or `os.PathLike`): the output folder (created if missing).
        config ([`SliMEConfig`]): the model's config.

    Raises:
        `ValueError`: the state dict holds no adapter weights.
    """
    from safetensors.torch import save_file

    table_dtype = getattr(torch, config.position_table_dtype)
    tensors = {}
    for key, tensor in state_dict.items():
        if not key.startswith(ADAPTER_PREFIXES):
            continue
        tensor = tensor.detach().to("cpu")
        if key.endswith(".position_table"):
            tensor = tensor.to(table_dtype)
        # A private copy: safetensors refuses tensors that share storage.
        tensors[key] = tensor.contiguous().clone()
    if not tensors:
        raise ValueError(f"the state dict holds no adapter weights (names starting with {ADAPTER_PREFIXES})")
    os.makedirs(folder, exist_ok=True)
    config.save_pretrained(folder)
    save_file(tensors, os.path.join(folder, ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})


def _merge_strict(target: dict[str, torch.Tensor], new: dict[str, torch.Tensor], source: str) -> None:
    for key, tensor in new.items():
        if key not in target:
            target[key] = tensor
            continue
        if target[key].shape != tensor.shape or not torch.equal(target[key], tensor.to(target[key].dtype)):
            raise ValueError(f"{source} gives {key} a different value than another adapter file of the same input")
        target[key] = tensor


def _read_original_adapter_file(path: str) -> dict[str, torch.Tensor]:
    with WeightFile(path) as weights:
        tensors = weights.read_all()
    renamed = _rename_all(tensors, path, ADAPTER_PREFIXES)
    parts = adapter_parts(renamed)
    if os.path.basename(path) == "mm_projector.bin" and parts == ["model.local_compressor."]:
        # The original trainer's intermediate checkpoint-N/ writes the sampler dict under this name.
        logger.info(
            f"{path} holds the local compressor (sampler) weights only, as the original trainer's "
            "checkpoint-N/ folders do; reading them as such"
        )
    return renamed


def load_adapter_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """
    Reads SliME adapter weights in the package's names.

    Args:
        path (`str` or `os.PathLike`): one of
            - a stage checkpoint folder (`slime_adapters.safetensors`), or that file;
            - a folder with the authors' `mm_projector.bin` and/or `sampler.bin` (stage 1/2 outputs), including the
              original trainer's `checkpoint-N/`, whose `mm_projector.bin` holds the sampler weights: those are
              returned as local-compressor weights, for what they are;
            - a single such `.bin` file.

    Returns:
        `dict[str, torch.Tensor]`: names under `ADAPTER_PREFIXES` (the original's dead `mean`/`std` buffers dropped).

    Raises:
        `ValueError`: nothing to read, names that are not adapter weights (listed), or two files disagreeing.
    """
    path = str(path)
    if os.path.isdir(path):
        stage_file = os.path.join(path, ADAPTER_WEIGHTS_NAME)
        if os.path.isfile(stage_file):
            return load_adapter_weights(stage_file)
        files = [os.path.join(path, n) for n in ORIGINAL_ADAPTER_FILES if os.path.isfile(os.path.join(path, n))]
        if not files:
            raise ValueError(
                f"{path} holds no adapter weights ({ADAPTER_WEIGHTS_NAME} or {' / '.join(ORIGINAL_ADAPTER_FILES)})"
            )
    elif os.path.isfile(path):
        files = [path]
    else:
        raise ValueError(f"{path} does not exist")
    state_dict: dict[str, torch.Tensor] = {}
    for file in files:
        if file.endswith(".safetensors"):
            with WeightFile(file) as weights:
                tensors = weights.read_all()
            outside = sorted(k for k in tensors if not k.startswith(ADAPTER_PREFIXES))
            if outside:
                raise ValueError(f"{file} holds weights that are not SliME adapter weights: {outside[:12]}")
            _merge_strict(state_dict, tensors, file)
        else:
            _merge_strict(state_dict, _read_original_adapter_file(file), file)
    if not state_dict:
        raise ValueError(f"{path} holds no adapter weights")
    return state_dict


def load_non_lora_trainables(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """
    Reads the non-LoRA trainable weights saved beside a LoRA adapter, in the package's names.

    Two layouts: the authors' `non_lora_trainables.bin` (a pickle, names `base_model.model.model.mm_projector.*` /
    `base_model.model.model.sampler.post_qformer.*`, without the position tables) and the package's
    `non_lora_trainables.safetensors` (names of the `SliMEForConditionalGeneration` state dict, e.g.
    `model.projector.linear_1.weight`).

    Args:
        path (`str` or `os.PathLike`): the file, or the LoRA folder holding it (safetensors preferred).

    Returns:
        `dict[str, torch.Tensor]`: package names.

    Raises:
        `ValueError`: no such file, or names of no SliME layout (listed).
    """
    path = str(path)
    if os.path.isdir(path):
        files = [os.path.join(path, n) for n in NON_LORA_TRAINABLES_FILES if os.path.isfile(os.path.join(path, n))]
        if not files:
            raise ValueError(f"{path} holds no {' or '.join(NON_LORA_TRAINABLES_FILES)}")
        path = files[0]
    with WeightFile(path) as weights:
        tensors = weights.read_all()
    return _rename_all(tensors, path, PACKAGE_PREFIXES, what="weights of a SliME model")


# ----------------------------------------------------------------------------------------------------------------
# LoRA
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class LoraTarget:
    """One LoRA-adapted weight: `W + scale * B @ A` (transposed for embeddings and fan-in-fan-out layers)."""

    lora_a: str
    lora_b: str
    scale: float
    transpose: bool = False


def _pattern_value(patterns: dict, module_name: str, default):
    # peft's rule (utils.other.get_pattern_key): a pattern matches the end of the module name at a dot boundary.
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module_name):
            return value
    return default


class LoraAdapter:
    """
    A peft LoRA adapter folder (`adapter_config.json` + `adapter_model.safetensors|bin`), read lazily and merged
    tensor by tensor.

    Adapter names may be in the authors' layout (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`,
    peft around `LlavaLlamaForCausalLM` or a plain Llama) or the package's (`...model.language_model.layers...`).

    Args:
        folder (`str` or `os.PathLike`): the adapter folder.

    Raises:
        `ValueError`: unsupported LoRA variants (DoRA, trained biases), unpaired or unknown names.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = str(folder)
        self.config = read_json(os.path.join(self.folder, LORA_CONFIG_NAME))
        if self.config.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"{self.folder}: only LoRA adapters can be merged, got {self.config['peft_type']!r}")
        if self.config.get("use_dora"):
            raise ValueError(f"{self.folder}: DoRA adapters are not supported")
        if self.config.get("bias", "none") != "none" or self.config.get("lora_bias"):
            raise ValueError(f"{self.folder}: LoRA with trained biases (bias={self.config['bias']!r}) is not supported")
        weights_path = next(
            (os.path.join(self.folder, n) for n in LORA_WEIGHTS_NAMES if os.path.isfile(os.path.join(self.folder, n))),
            None,
        )
        if weights_path is None:
            raise ValueError(f"{self.folder} has no {' or '.join(LORA_WEIGHTS_NAMES)}")
        self.weights = WeightFile(weights_path)
        self.targets: dict[str, LoraTarget] = self._targets()

    @property
    def base_model_name_or_path(self) -> str | None:
        """The base model recorded by peft."""
        return self.config.get("base_model_name_or_path")

    def _targets(self) -> dict[str, LoraTarget]:
        pairs: dict[str, dict[str, str]] = {}
        unknown = []
        # peft names: `<module>.lora_A.weight` (Linear) or `<module>.lora_embedding_A` (Embedding), optionally with
        # the adapter name before the parameter name.
        pattern = re.compile(
            r"^(?P<module>.+)\.(?:(?P<linear>lora_[AB])(?:\.[^.]+)?\.weight|"
            r"(?P<embedding>lora_embedding_[AB])(?:\.[^.]+)?)$"
        )
        for key in self.weights.keys():
            match = pattern.match(strip_peft_prefix(key))
            if match is None:
                unknown.append(key)
                continue
            kind = (match["linear"] or match["embedding"])[-1]
            pairs.setdefault(match["module"], {})[kind] = key
            pairs[match["module"]]["embedding"] = match["embedding"] is not None
        if unknown:
            raise ValueError(
                f"{self.weights.path} holds weights that are not LoRA pairs (modules_to_save and trained "
                f"biases are not supported): {sorted(unknown)[:12]}"
            )
        r, alpha = self.config.get("r", 8), self.config.get("lora_alpha", 8)
        targets = {}
        for module, pair in pairs.items():
            if "A" not in pair or "B" not in pair:
                raise ValueError(f"{self.weights.path}: {module} has lora_A or lora_B but not both")
            rank = _pattern_value(self.config.get("rank_pattern"), module, r)
            module_alpha = _pattern_value(self.config.get("alpha_pattern"), module, alpha)
            scale = module_alpha / math.sqrt(rank) if self.config.get("use_rslora") else module_alpha / rank
            try:
                target = to_package_name(module + ".weight")
            except KeyError:
                raise ValueError(f"{self.weights.path}: LoRA on {module}, not a weight of a SliME model") from None
            transpose = bool(pair["embedding"]) or bool(self.config.get("fan_in_fan_out"))
            targets[target] = LoraTarget(pair["A"], pair["B"], scale, transpose)
        return targets

    def merge(self, name: str, weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """
        Merges the adapter into one base weight (returned unchanged when the adapter does not target it).

        Args:
            name (`str`): the weight's package name.
            weight (`torch.Tensor`): the base weight.
            dtype (`torch.dtype`, *optional*): the result's dtype (defaults to the weight's). The sum is computed in
                float32 either way.
        """
        dtype = dtype or weight.dtype
        target = self.targets.get(name)
        if target is None:
            return weight.to(dtype)
        lora_a = self.weights.get(target.lora_a).to(torch.float32)
        lora_b = self.weights.get(target.lora_b).to(torch.float32)
        delta = lora_b @ lora_a
        if target.transpose:
            delta = delta.T
        if delta.shape != weight.shape:
            raise ValueError(f"LoRA update of {name} has shape {tuple(delta.shape)}, the weight {tuple(weight.shape)}")
        return torch.add(weight.to(torch.float32), delta, alpha=target.scale).to(dtype)

    def close(self) -> None:
        """Releases the adapter file."""
        self.weights.close()


__all__ = [
    "ADAPTER_PREFIXES",
    "ADAPTER_WEIGHTS_NAME",
    "CHECKPOINT_KINDS",
    "ORIGINAL_MM_FIELDS",
    "ORIGINAL_TO_PACKAGE_NAMES",
    "LoraAdapter",
    "WeightFile",
    "adapter_parts",
    "checkpoint_weight_files",
    "config_from_original",
    "detect_checkpoint_kind",
    "is_original_layout",
    "load_adapter_weights",
    "load_non_lora_trainables",
    "load_original_model",
    "load_original_state_dict",
    "load_vision_tower_weights",
    "rename_original_key",
    "rename_original_state_dict",
    "resolve_vision_config",
    "save_adapter_weights",
    "separator_token_id",
    "to_package_name",
    "vision_tower_name",
]
