"""Reading SliME checkpoints in every layout: the authors' full checkpoints, LoRA releases and stage-1/2 adapter
files, and the package's stage checkpoints and LoRA outputs.

Weight names are translated with the one table of `modeling_slime` (`rename_original_key`); this module only knows
which files hold what. Pickled `.bin` files are read with `torch.load(weights_only=True)` (memory-mapped where the
file allows it), so no code from a checkpoint is ever executed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass

import torch

from .configuration_slime import SliMEConfig
from .modeling_slime import is_original_layout, rename_original_key


logger = logging.getLogger(__name__)

ADAPTER_WEIGHTS_NAME = "slime_adapters.safetensors"
ADAPTER_PREFIXES = ("model.projector.", "model.global_adapter.", "model.local_compressor.")
# Names of the state dict of `SliMEForConditionalGeneration` (as saved: the vision tower under `vision_model.`).
PACKAGE_PREFIXES = ("model.vision_tower.", "model.language_model.", "lm_head.") + ADAPTER_PREFIXES
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
# Non-persistent buffers that older transformers versions saved (Llama's rotary inverse frequencies).
_STALE_BUFFERS = re.compile(r"\.rotary_emb\.inv_freq$")
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
# Names
# ----------------------------------------------------------------------------------------------------------------
def to_package_name(key: str) -> str | None:
    """
    The package's name of one weight name of any SliME layout.

    Names of the authors' layout (and of a plain Llama checkpoint: `model.layers.*`, `lm_head.*`) are renamed with
    the table of `modeling_slime`; names already in the package's layout pass through. `None` means the tensor is
    deliberately dropped (the original's dead `mean`/`std` buffers, stale position-id and rotary buffers).

    Args:
        key (`str`): a weight name, without any peft prefix.

    Returns:
        `str` or `None`: the package name.

    Raises:
        `KeyError`: the name belongs to no known layout.
    """
    if _STALE_BUFFERS.search(key):
        return None
    try:
        return rename_original_key(key)
    except KeyError:
        if key.startswith(PACKAGE_PREFIXES):
            return key
        raise


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
    "LoraAdapter",
    "WeightFile",
    "adapter_parts",
    "checkpoint_weight_files",
    "detect_checkpoint_kind",
    "load_adapter_weights",
    "load_non_lora_trainables",
    "save_adapter_weights",
    "to_package_name",
]
