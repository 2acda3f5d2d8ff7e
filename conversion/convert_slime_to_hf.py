#!/usr/bin/env python
"""Converts a released SliME checkpoint into a self-contained Hugging Face repo.

    python conversion/convert_slime_to_hf.py --input DIR_OR_REPO_ID --output DIR [--base DIR_OR_ID]
        [--vision-tower DIR_OR_ID] [--dtype bfloat16|float16|float32] [--max-shard-size 5GB]
        [--push-to-hub REPO_ID] [--private] [--no-verify]

What the input holds is read from its files and weight names (see `slime_hf.checkpoints.detect_checkpoint_kind`):

- a full checkpoint (the authors' `llava_llama` layout, CLIP inside): converted as is;
- a LoRA release (`adapter_config.json` + `adapter_model.*` + `non_lora_trainables.*`): merged into the base language
  model (`--base`, else the one its adapter config names) tensor by tensor, the vision tower from `--vision-tower`
  (else the config's `mm_vision_tower`);
- stage-1/2 adapter files (`mm_projector.bin`, `sampler.bin`): written as a stage checkpoint (config + adapter weights,
  the start of the next training stage); needs `--base` and `--vision-tower` for the config.

Weights are streamed: one input tensor at a time is read, renamed with the package's one name table, cast (the
resamplers' position tables stay float16) and appended to the output shard on disk, so the model is never held in
memory. Everything is written to a temporary folder beside the output and moved into place only after the
verification (the output reloaded through the Auto classes in a process where `slime_hf` cannot be imported and
compared with the package's own load of the input) passed. An interrupted run removes that folder (Ctrl-C, SIGTERM,
SIGHUP); one killed outright leaves it, and the next conversion to the same output removes it and says so.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm


try:
    import slime_hf
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import slime_hf
from slime_hf import SliMEConfig, SliMEForConditionalGeneration, SliMEProcessor
from slime_hf.checkpoints import (
    ADAPTER_PARTS,
    ADAPTER_PREFIXES,
    ADAPTER_WEIGHTS_NAME,
    ORIGINAL_MM_FIELDS,
    SAFETENSORS_DTYPES,
    LoraAdapter,
    WeightFile,
    checkpoint_weight_files,
    config_from_original,
    detect_checkpoint_kind,
    is_original_layout,
    load_adapter_weights,
    load_non_lora_trainables,
    read_json,
    save_adapter_weights,
    strip_peft_prefix,
    to_package_name,
)
from slime_hf.model_card import SliMERelease, find_release, match_release, save_model_card
from slime_hf.modeling_slime import AUTO_MAP, copy_remote_code, sincos_position_table


logger = logging.getLogger("slime_hf.conversion")

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Verification bound on the last-position logits, times max(1, max |reference logit|): both sides run in the output
# dtype, so only the order of operations differs (float32), or also half-precision rounding of merged weights.
LOGITS_BOUNDS = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)
PROCESSOR_FILES = ("processor_config.json", "chat_template.jinja", "chat_template.json", "preprocessor_config.json")
HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/[\w./-]+)?$")
VERIFY_PROMPT = "Describe this image in detail."
VERIFY_IMAGE = Path(slime_hf.__file__).resolve().parent / "assets" / "demo_image.png"
VERIFY_NEW_TOKENS = 12
_SAFETENSORS_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}


class ConversionError(ValueError):
    """The input cannot be converted (missing files or weights, wrong model type, existing output, ...)."""


class VerificationError(RuntimeError):
    """The converted repo does not reproduce the input."""


# ----------------------------------------------------------------------------------------------------------------
# Inputs: local folders or Hub repos (only the files a conversion needs are downloaded)
# ----------------------------------------------------------------------------------------------------------------
def _weight_file_names(files: list[str]) -> list[str]:
    safetensors = [f for f in files if re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?", f)]
    if safetensors:
        return safetensors
    return [f for f in files if re.fullmatch(r"pytorch_model(-\d+-of-\d+)?\.bin(\.index\.json)?", f)]


def needed_files(files: list[str], role: str) -> list[str]:
    """
    The files of a repo a conversion reads, by role: `"input"` (any SliME layout), `"base"` (a language model or
    SliME checkpoint) or `"vision"` (a CLIP checkpoint). Optimizer states, DeepSpeed folders, duplicate weight
    formats and other checkpoints are left out.

    Args:
        files (`list[str]`): the repo's file names (relative paths).
        role (`str`): `"input"`, `"base"` or `"vision"`.
    """
    root = [f for f in files if "/" not in f]
    wanted = ["config.json"] + _weight_file_names(root)
    if role in ("input", "base"):
        wanted += ["generation_config.json", *TOKENIZER_FILES, *PROCESSOR_FILES]
    if role == "input":
        adapter_model = [f for f in ("adapter_model.safetensors", "adapter_model.bin") if f in root][:1]
        wanted += [
            "adapter_config.json",
            *adapter_model,
            "non_lora_trainables.safetensors",
            "non_lora_trainables.bin",
            "mm_projector.bin",
            "sampler.bin",
            ADAPTER_WEIGHTS_NAME,
        ]
    return [f for f in dict.fromkeys(wanted) if f in root]


def resolve_path(reference: str, role: str = "input") -> str:
    """
    A local folder (or file) for `reference`: the path itself when it exists, else a Hub repo id (optionally followed
    by a subfolder, `owner/name/sub/folder`) downloaded with `huggingface_hub.snapshot_download`, needed files only.

    Raises:
        `ConversionError`: neither an existing path nor a repo id.
    """
    if os.path.exists(reference):
        return os.path.abspath(reference)
    if not HUB_REPO_ID.match(reference):
        raise ConversionError(f"{reference!r} is neither an existing path nor a Hub repo id")
    import huggingface_hub

    owner, name, *sub = reference.split("/")
    repo_id, subfolder = f"{owner}/{name}", "/".join(sub)
    prefix = subfolder + "/" if subfolder else ""
    files = [f[len(prefix) :] for f in huggingface_hub.HfApi().list_repo_files(repo_id) if f.startswith(prefix)]
    wanted = needed_files(files, role)
    if not wanted:
        raise ConversionError(
            f"the Hub repo {reference} holds none of the files a SliME conversion reads: {files[:20]}"
        )
    logger.info(f"downloading {len(wanted)} files of {reference}: {wanted}")
    local = huggingface_hub.snapshot_download(repo_id, allow_patterns=[prefix + f for f in wanted])
    return os.path.join(local, subfolder) if subfolder else local


# ----------------------------------------------------------------------------------------------------------------
# Tensor plan: every output tensor with its source, shape and dtype, checked before anything is read
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class PlannedTensor:
    """One output tensor: package name, output shape and dtype, where it comes from and how it is loaded."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    source: str
    load: Callable[[], torch.Tensor]
    load_unmerged: Callable[[], torch.Tensor] | None = None

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.empty(0, dtype=self.dtype).element_size()


class _OpenFiles:
    """Keeps the weight file being read open (one at a time, so memory maps of earlier shards are released)."""

    def __init__(self):
        self._path, self._file = None, None

    def get(self, path: str, key: str) -> torch.Tensor:
        if path != self._path:
            self.close()
            self._path, self._file = path, WeightFile(path)
        return self._file.get(key)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._path, self._file = None, None


def _canonical(name: str) -> str:
    # transformers saves CLIPVisionModel weights under `vision_model.` and strips that prefix in memory.
    return name.replace("model.vision_tower.vision_model.", "model.vision_tower.", 1)


def expected_tensors(config: SliMEConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shapes and dtypes of every weight of a model with this config (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = SliMEForConditionalGeneration(config)
    return {_canonical(k): (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


@dataclass
class Plan:
    """The output weights of a conversion, in writing order."""

    config: SliMEConfig
    dtype: torch.dtype | None
    tensors: dict[str, PlannedTensor] = field(default_factory=dict)
    files: _OpenFiles = field(default_factory=_OpenFiles)
    lora: LoraAdapter | None = None

    def output_dtype(self, name: str, source_dtype: torch.dtype) -> torch.dtype:
        if name.endswith(".position_table"):
            return getattr(torch, self.config.position_table_dtype)  # float16 for the releases (Decision 6)
        if self.dtype is None or not source_dtype.is_floating_point:
            return source_dtype
        return self.dtype

    def add_file(self, path: str, names: Callable[[str], str | None] | None = None) -> None:
        """Plans every tensor of one weight file (renamed with `names`, default: any SliME layout -> package)."""
        unknown = []
        with WeightFile(path) as weights:
            for key in weights.keys():
                try:
                    name = names(key) if names is not None else to_package_name(strip_peft_prefix(key))
                except KeyError:
                    unknown.append(key)
                    continue
                if name is None:
                    continue
                if name in self.tensors:
                    raise ConversionError(f"{name} is given twice: in {self.tensors[name].source} and in {path}")
                out_dtype = self.output_dtype(name, weights.dtype(key))
                self.tensors[name] = PlannedTensor(
                    name,
                    weights.shape(key),
                    out_dtype,
                    path,
                    load=self._loader(path, key, name, out_dtype, merge=True),
                    load_unmerged=self._loader(path, key, name, out_dtype, merge=False),
                )
        if unknown:
            raise ConversionError(f"{path} holds weights of no SliME layout ({len(unknown)}): {sorted(unknown)[:12]}")

    def _loader(self, path: str, key: str, name: str, dtype: torch.dtype, merge: bool) -> Callable[[], torch.Tensor]:
        def load() -> torch.Tensor:
            tensor = self.files.get(path, key)
            if merge and self.lora is not None:
                return self.lora.merge(name, tensor, dtype)
            return tensor.to(dtype)

        return load

    def add_tensors(self, tensors: dict[str, torch.Tensor], source: str, override: bool = False) -> None:
        """Plans tensors already in memory (small: adapters, non-LoRA trainables)."""
        for name, tensor in tensors.items():
            if name in self.tensors and not override:
                raise ConversionError(f"{name} is given twice: in {self.tensors[name].source} and in {source}")
            out_dtype = self.output_dtype(name, tensor.dtype)
            self.tensors[name] = PlannedTensor(
                name, tuple(tensor.shape), out_dtype, source, load=lambda t=tensor, d=out_dtype: t.to(d)
            )

    def check(self, only_adapters: bool = False) -> None:
        """Checks names and shapes against the model the config describes, generates missing position tables (the
        original's fp16-rounded sin-cos values: LoRA releases do not save them) and explains what is missing.
        `only_adapters`: a stage checkpoint, where only the MLP expert and the global adapter are required."""
        expected = expected_tensors(self.config)
        if only_adapters:
            expected = {k: v for k, v in expected.items() if k.startswith(ADAPTER_PREFIXES)}
        unexpected = sorted(n for n in self.tensors if _canonical(n) not in expected)
        if unexpected:
            raise ConversionError(
                f"weights that a SliME model with this config does not have ({len(unexpected)}): {unexpected[:12]}"
            )
        for name, planned in self.tensors.items():
            shape = expected[_canonical(name)][0]
            if planned.shape != shape:
                raise ConversionError(
                    f"{name} from {planned.source} has shape {planned.shape}, the config says {shape}"
                )
        present = {_canonical(n) for n in self.tensors}
        missing = [n for n in expected if n not in present]
        if self.config.tie_word_embeddings:
            missing = [n for n in missing if n != "lm_head.weight"]
            self.tensors.pop("lm_head.weight", None)
        local = [n for n in expected if n.startswith("model.local_compressor.")]
        if only_adapters and local and all(n in missing for n in local):
            logger.warning(
                "the adapter files hold no local compressor (sampler) weights: the stage checkpoint has the "
                "global adapter and the MLP expert only"
            )
            missing = [n for n in missing if n not in local]
        for name in [n for n in missing if n.endswith(".position_table")]:
            shape, dtype = expected[name]
            side = int(round(shape[0] ** 0.5))
            self.tensors[name] = PlannedTensor(
                name,
                shape,
                dtype,
                "generated (sin-cos table)",
                load=lambda dim=shape[1], grid=side, d=dtype: sincos_position_table(dim, grid).to(d),
            )
            missing.remove(name)
        if missing:
            raise ConversionError(_missing_message(missing))

    def close(self) -> None:
        self.files.close()
        if self.lora is not None:
            self.lora.close()


def _missing_message(missing: list[str]) -> str:
    groups = Counter(next((p for p in ADAPTER_PARTS if n.startswith(p)), n.rsplit(".", 2)[0] + ".*") for n in missing)
    lines = [f"  {ADAPTER_PARTS.get(group, group)}: {count} tensor(s)" for group, count in groups.items()]
    message = "the inputs hold no weights for:\n" + "\n".join(lines)
    if any(n.startswith(("model.projector.", "model.global_adapter.")) for n in missing):
        message += (
            "\nThe global adapter and MLP expert come from an `mm_projector.bin` (model.mm_projector.*); the inputs "
            "have none (an original trainer's checkpoint-N/mm_projector.bin holds the sampler weights instead). Pass "
            "the stage's final mm_projector.bin (or the folder holding it) with --mm-projector PATH."
        )
    if any(n.startswith("model.vision_tower.") for n in missing):
        message += "\nThe vision tower is not in the checkpoint: pass a CLIP checkpoint with --vision-tower DIR_OR_ID."
    return message


# ----------------------------------------------------------------------------------------------------------------
# Streaming safetensors writer
# ----------------------------------------------------------------------------------------------------------------
def parse_size(size: str | int) -> int:
    """`"5GB"` -> 5_000_000_000, `"500MiB"` -> 524_288_000 (transformers' convention)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)?\s*", size, flags=re.IGNORECASE)
    if match is None:
        raise ConversionError(f"cannot read the size {size!r} (e.g. 5GB, 500MB, 1GiB)")
    units = {
        "": 1,
        "kb": 10**3,
        "mb": 10**6,
        "gb": 10**9,
        "tb": 10**12,
        "kib": 2**10,
        "mib": 2**20,
        "gib": 2**30,
        "tib": 2**40,
    }
    return int(float(match[1]) * units[(match[2] or "").lower()])


def shard_plan(tensors: list[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    """Groups tensors, in order, into shards of at most `max_shard_bytes` (a bigger tensor gets a shard of its own)."""
    shards, current, size = [], [], 0
    for planned in tensors:
        if current and size + planned.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(planned)
        size += planned.nbytes
    if current:
        shards.append(current)
    return shards


def _write_shard(path: str, tensors: list[PlannedTensor], progress: tqdm) -> None:
    """Writes one safetensors file tensor by tensor: the header is known from the plan, so no shard is ever held in
    memory (format: little-endian u64 header size, JSON header padded to 8 bytes, then the raw data in order)."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for planned in tensors:
        header[planned.name] = {
            "dtype": _SAFETENSORS_CODES[planned.dtype],
            "shape": list(planned.shape),
            "data_offsets": [offset, offset + planned.nbytes],
        }
        offset += planned.nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(header_bytes)))
        handle.write(header_bytes)
        for planned in tensors:
            tensor = planned.load()
            if tuple(tensor.shape) != planned.shape or tensor.dtype != planned.dtype:
                raise ConversionError(
                    f"{planned.name} from {planned.source} is {tuple(tensor.shape)} {tensor.dtype}, "
                    f"its header says {planned.shape} {planned.dtype}"
                )
            data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
            handle.write(memoryview(data))
            progress.update(planned.nbytes)
            del tensor, data


def write_weights(plan: Plan, folder: str, max_shard_bytes: int) -> list[str]:
    """Streams the plan into `model.safetensors` or `model-0000i-of-0000N.safetensors` + index. Returns the files."""
    tensors = list(plan.tensors.values())
    shards = shard_plan(tensors, max_shard_bytes)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    )
    total = sum(t.nbytes for t in tensors)
    with tqdm(total=total, unit="B", unit_scale=True, desc="Converting weights") as progress:
        for name, shard in zip(names, shards):
            _write_shard(os.path.join(folder, name), shard, progress)
    plan.files.close()
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": total},
            "weight_map": {t.name: name for name, shard in zip(names, shards) for t in shard},
        }
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as handle:
            json.dump(index, handle, indent=2, sort_keys=True)
            handle.write("\n")
        names.append("model.safetensors.index.json")
    return names


# ----------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------
def _config_dict(folder: str | None) -> dict | None:
    path = os.path.join(folder, "config.json") if folder and os.path.isdir(folder) else None
    return read_json(path) if path and os.path.isfile(path) else None


def _slime_config(config_dict: dict, folder: str, vision_dir: str | None) -> tuple[SliMEConfig, str | None]:
    """A SliMEConfig from a config of either layout; `vision_dir` replaces the authors' `mm_vision_tower`."""
    if is_original_layout(config_dict):
        if vision_dir is not None:
            config_dict = dict(config_dict, mm_vision_tower=vision_dir)
        return config_from_original(config_dict, folder)
    if config_dict.get("model_type") == SliMEConfig.model_type:
        return SliMEConfig.from_dict(config_dict), vision_dir
    raise ConversionError(f"the config in {folder} has model_type {config_dict.get('model_type')!r}, not a SliME model")


def _separator_from_tokenizer(folder: str) -> int:
    # The original's separator is the last id of tokenizer(",") (REFERENCE_ALGORITHM 9, item 20).
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)(",").input_ids[-1]


def adapters_config(adapters_dir: str, base_dir: str, vision_dir: str) -> SliMEConfig:
    """The config of a stage checkpoint: the language model from `base_dir`, the multimodal fields from the adapter
    files' `config.json` (or the original defaults, separator from the base tokenizer, when there is none)."""
    base = _config_dict(base_dir)
    if base is None:
        raise ConversionError(f"the base model {base_dir} has no config.json")
    if is_original_layout(base) or base.get("model_type") == SliMEConfig.model_type:
        raise ConversionError(f"--base {base_dir} is a SliME checkpoint; adapter files need the base language model")
    language_fields = {k: v for k, v in base.items() if k not in ORIGINAL_MM_FIELDS}
    adapters = _config_dict(adapters_dir if os.path.isdir(adapters_dir) else os.path.dirname(adapters_dir)) or {}
    bookkeeping = ("architectures", "model_type", "_name_or_path", "transformers_version", "torch_dtype", "dtype")
    mm_fields = {k: v for k, v in adapters.items() if k in ORIGINAL_MM_FIELDS and k not in bookkeeping}
    if "seperator" not in mm_fields:
        mm_fields["seperator"] = _separator_from_tokenizer(base_dir)
    if language_fields.get("pad_token_id") is None and adapters.get("pad_token_id") is not None:
        language_fields["pad_token_id"] = adapters["pad_token_id"]  # the original trainer sets it from the tokenizer
    config_dict = {**language_fields, **mm_fields, "mm_vision_tower": vision_dir, "model_type": "llava_llama"}
    return config_from_original(config_dict, base_dir)[0]


def _default_dtype(config_dict: dict | None) -> torch.dtype:
    """The checkpoint's own dtype (`torch_dtype` of the authors' configs, `dtype` of transformers 5), else float32."""
    name = (config_dict or {}).get("torch_dtype") or (config_dict or {}).get("dtype")
    return DTYPES.get(name, torch.float32)


def _hub_like(name: str | None) -> str | None:
    if name and HUB_REPO_ID.match(name) and not name.startswith((".", "/")) and name.count("/") == 1:
        return name
    return None


# ----------------------------------------------------------------------------------------------------------------
# The conversion
# ----------------------------------------------------------------------------------------------------------------
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


def _vision_names(key: str) -> str | None:
    # A CLIP checkpoint (full CLIP or vision-only): its vision weights, without the position-id buffer.
    if key.startswith("vision_model.") and not key.endswith("position_ids"):
        return "model.vision_tower." + key
    return None


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
        plan.add_file(path, names=_vision_names)


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
    return any(
        os.path.isfile(os.path.join(folder, f)) for f in ("non_lora_trainables.safetensors", "non_lora_trainables.bin")
    )


def _output_dtype(args: argparse.Namespace, config_dict: dict | None) -> torch.dtype:
    return DTYPES[args.dtype] if args.dtype else _default_dtype(config_dict)


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
        return Conversion(kind, input_dir, plan, base_model=_hub_like(args.base), release=release)

    if kind == "full":
        config_dict = _config_dict(input_dir)
        config, config_vision_dir = _slime_config(config_dict, input_dir, vision_dir)
        plan = Plan(config, _output_dtype(args, config_dict))
        for path in checkpoint_weight_files(input_dir):
            plan.add_file(path)
        vision_inside = any(n.startswith("model.vision_tower.") for n in plan.tensors)
        _add_vision_tower(plan, vision_dir or config_vision_dir, config_dict.get("mm_vision_tower"))
        _add_mm_projector(plan, args.mm_projector)
        base_model = release.base_model if release else _hub_like(config_dict.get("_name_or_path"))
        conversion = Conversion(kind, input_dir, plan, tokenizer_dir=input_dir, base_model=base_model, release=release)
        if vision_inside and not args.vision_tower and not args.mm_projector:
            conversion.reference_dir = input_dir
    else:  # lora
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
        config_dict = _config_dict(input_dir) or _config_dict(base_dir)
        if config_dict is None or not (
            is_original_layout(config_dict) or config_dict.get("model_type") == SliMEConfig.model_type
        ):
            raise ConversionError(f"neither {input_dir} nor the base {base_dir} has a SliME config.json")
        config, config_vision_dir = _slime_config(config_dict, input_dir, vision_dir)
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
            kind,
            input_dir,
            plan,
            tokenizer_dir=input_dir if has_tokenizer else base_dir,
            base_model=_hub_like(base_ref) or (release.base_model if release else None),
            release=release,
        )
        if os.path.isfile(os.path.join(base_dir, "generation_config.json")):
            conversion.generation_config = os.path.join(base_dir, "generation_config.json")
    plan.check()
    if conversion.release is None:
        text = config.text_config
        conversion.release = match_release(text.hidden_size, text.num_hidden_layers, text.vocab_size)
    if os.path.isfile(os.path.join(input_dir, "generation_config.json")):
        conversion.generation_config = os.path.join(input_dir, "generation_config.json")
    return conversion


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _save_config(config: SliMEConfig, dtype: torch.dtype, folder: str) -> None:
    config = SliMEConfig.from_dict(config.to_dict())
    dtype_name = _dtype_name(dtype)
    for sub in (config, config.text_config, config.vision_config):
        sub.dtype = dtype_name
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
    save_model_card(folder, chat_template=_template_name(processor), **card)


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


def _template_name(processor: SliMEProcessor) -> str | None:
    templates = processor.chat_template
    if not isinstance(templates, dict):
        return None
    return next(
        (name for name, text in templates.items() if name != "default" and text == templates.get("default")), None
    )


# ----------------------------------------------------------------------------------------------------------------
# Verification: the output, loaded by the Auto classes where slime_hf cannot be imported, against the package's own
# load of the input
# ----------------------------------------------------------------------------------------------------------------
HIDE_PACKAGE = """
import sys
class _HidePackage:
    def find_spec(self, name, path=None, target=None):
        if name == "slime_hf" or name.startswith("slime_hf."):
            raise ImportError("slime_hf is hidden: the repo must load from its own code files")
sys.meta_path.insert(0, _HidePackage())
"""

# Run in both processes, so that both sides compute exactly the same thing.
CHECK_CODE = """
import torch
from PIL import Image

def verification_outputs(model, processor, image_path, prompt, new_tokens, device):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[Image.open(image_path)], text=text, return_tensors="pt")
    on_device = {key: value.to(device) for key, value in inputs.items()}
    with torch.no_grad():
        logits = model(**on_device).logits[:, -1].float().cpu()
    generated = model.generate(**on_device, do_sample=False, max_new_tokens=new_tokens)
    return {"input_ids": inputs["input_ids"], "pixel_values": inputs["pixel_values"], "logits_last": logits,
            "new_ids": generated[:, inputs["input_ids"].shape[1]:].cpu()}
"""

VERIFY_SCRIPT = (
    HIDE_PACKAGE
    + CHECK_CODE
    + """
import sys
from transformers import AutoModel, AutoProcessor

try:
    import slime_hf  # noqa: F401
    raise SystemExit("slime_hf must not be importable in the verification process")
except ImportError:
    pass
folder, image_path, prompt, new_tokens, device, out_path = sys.argv[1:7]
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
model = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype="auto").to(device).eval()
torch.save(verification_outputs(model, processor, image_path, prompt, int(new_tokens), device), out_path)
"""
)


def _check_namespace() -> dict:
    namespace: dict = {}
    exec(CHECK_CODE, namespace)  # noqa: S102 - our own constant, shared with the subprocess
    return namespace


def run_without_package(script: str, args: list[str], workdir: str) -> subprocess.CompletedProcess:
    """Runs a Python script in a fresh process where `slime_hf` cannot be imported (the script installs the blocker)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=os.path.join(workdir, "hf_modules"), TRANSFORMERS_VERBOSITY="error")
    return subprocess.run([sys.executable, "-c", script, *args], cwd=workdir, env=env, capture_output=True, text=True)


def _lora_hooks(model: torch.nn.Module, lora: LoraAdapter) -> None:
    """Applies the LoRA unmerged, as peft runs it: y = W x + scale * B (A x)."""
    import torch.nn.functional as F

    for name, target in lora.targets.items():
        module = model.get_submodule(name.removesuffix(".weight"))
        dtype = module.weight.dtype
        lora_a = lora.weights.get(target.lora_a).to(dtype)
        lora_b = lora.weights.get(target.lora_b).to(dtype)

        def hook(module, inputs, output, a=lora_a, b=lora_b, scale=target.scale):
            return output + scale * F.linear(F.linear(inputs[0], a), b)

        module.register_forward_hook(hook)


def reference_model(conversion: Conversion, device: str) -> SliMEForConditionalGeneration:
    """The package's own load of the input: `from_pretrained` of the checkpoint where it can read it directly,
    else the planned input tensors (LoRA applied unmerged, through forward hooks)."""
    plan = conversion.plan
    if conversion.reference_dir is not None:
        model = SliMEForConditionalGeneration.from_pretrained(conversion.reference_dir, dtype=plan.dtype)
    else:
        lora = plan.lora
        hooked = lora is not None and not any(t.transpose for t in lora.targets.values())
        state_dict = {}
        for name, planned in plan.tensors.items():
            state_dict[name] = planned.load_unmerged() if hooked and planned.load_unmerged else planned.load()
        plan.files.close()
        model = SliMEForConditionalGeneration.from_pretrained(
            None, config=conversion.config, state_dict=state_dict, dtype=plan.dtype
        )
        del state_dict
        if hooked:
            _lora_hooks(model, lora)
        if conversion.generation_config:
            from transformers import GenerationConfig

            model.generation_config = GenerationConfig.from_pretrained(
                os.path.dirname(conversion.generation_config), "generation_config.json"
            )
    return model.to(device).eval()


def verify(conversion: Conversion, folder: str, args: argparse.Namespace) -> dict:
    """
    Compares the written repo, loaded through the Auto classes in a process without `slime_hf`, with the package's
    load of the input: token ids of a test prompt, pixel values, last-position logits (within a bound fit for the
    dtype) and greedy ids.

    Returns:
        `dict`: the measured differences.

    Raises:
        `VerificationError`: any mismatch.
    """
    dtype = conversion.plan.dtype
    processor = SliMEProcessor.from_pretrained(conversion.tokenizer_dir, chat_template_name=args.chat_template)
    model = reference_model(conversion, args.verify_device)
    reference = _check_namespace()["verification_outputs"](
        model, processor, str(VERIFY_IMAGE), VERIFY_PROMPT, VERIFY_NEW_TOKENS, args.verify_device
    )
    del model
    with tempfile.TemporaryDirectory(prefix="slime-verify-") as workdir:
        out_path = os.path.join(workdir, "converted.pt")
        result = run_without_package(
            VERIFY_SCRIPT,
            [folder, str(VERIFY_IMAGE), VERIFY_PROMPT, str(VERIFY_NEW_TOKENS), args.verify_device, out_path],
            workdir,
        )
        if result.returncode != 0:
            raise VerificationError(
                "the converted repo does not load or run through the Auto classes without "
                f"slime_hf:\n{result.stderr[-3000:]}"
            )
        converted = torch.load(out_path, weights_only=True)
    problems = []
    if not torch.equal(converted["input_ids"], reference["input_ids"]):
        problems.append(f"token ids differ: {converted['input_ids'].tolist()} vs {reference['input_ids'].tolist()}")
    if not torch.equal(converted["pixel_values"], reference["pixel_values"]):
        problems.append("pixel values differ")
    diff = (converted["logits_last"] - reference["logits_last"]).abs().max().item()
    bound = LOGITS_BOUNDS[dtype] * max(1.0, reference["logits_last"].abs().max().item())
    if not diff <= bound:
        problems.append(f"last-position logits differ by {diff:.3g} (bound {bound:.3g} for {_dtype_name(dtype)})")
    if not torch.equal(converted["new_ids"], reference["new_ids"]):
        problems.append(f"greedy ids differ: {converted['new_ids'].tolist()} vs {reference['new_ids'].tolist()}")
    report = {
        "input_ids": reference["input_ids"].shape[1],
        "logits_max_abs_diff": diff,
        "logits_bound": bound,
        "greedy_ids": reference["new_ids"][0].tolist(),
    }
    logger.info(
        f"verification: {report['input_ids']} prompt ids, pixel values "
        f"{tuple(reference['pixel_values'].shape)}, "
        f"last-position logits max |diff| = {diff:.3g} (bound {bound:.3g}, {_dtype_name(dtype)}), "
        f"{VERIFY_NEW_TOKENS} greedy ids {'equal' if not problems else 'checked'}"
    )
    if problems:
        raise VerificationError("the converted repo does not reproduce the input:\n  " + "\n  ".join(problems))
    return report


def verify_stage_checkpoint(conversion: Conversion, folder: str) -> None:
    """A stage checkpoint holds exactly the planned adapter tensors and a config that loads."""
    saved = load_adapter_weights(folder)
    planned = {name: t.load() for name, t in conversion.plan.tensors.items()}
    if set(saved) != set(planned):
        raise VerificationError(f"the stage checkpoint holds {sorted(set(saved) ^ set(planned))[:8]} unexpectedly")
    for name, tensor in planned.items():
        if not torch.equal(saved[name], tensor.to(saved[name].dtype)):
            raise VerificationError(f"{name} differs after saving")
    SliMEConfig.from_pretrained(folder)
    logger.info(f"verification: {len(saved)} adapter tensors equal after reloading, config reloads")


# ----------------------------------------------------------------------------------------------------------------
# Hub upload and command line
# ----------------------------------------------------------------------------------------------------------------
def push_to_hub(folder: str, repo_id: str, private: bool) -> None:
    """Uploads the verified folder to a (new or existing) Hub model repo."""
    import huggingface_hub

    api = huggingface_hub.HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(
        repo_id=repo_id, repo_type="model", folder_path=folder, commit_message="Upload SliME converted with slime-hf"
    )
    logger.info(f"uploaded {folder} to https://huggingface.co/{repo_id}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", required=True, help="local folder (or adapter file) or Hub repo id of the release")
    parser.add_argument("--output", required=True, help="output folder (must not exist)")
    parser.add_argument("--base", help="base language model of a LoRA release or of adapter files (folder or id)")
    parser.add_argument("--vision-tower", help="CLIP checkpoint (folder or id) when the input does not hold it")
    parser.add_argument(
        "--mm-projector",
        help="an mm_projector.bin (or its folder) for inputs without the global "
        "adapter, e.g. an original trainer's checkpoint-N/",
    )
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        help="weight dtype (default: the checkpoint's torch_dtype); position tables stay float16",
    )
    parser.add_argument("--max-shard-size", default="5GB", help="largest output shard (default 5GB)")
    parser.add_argument(
        "--chat-template", help="default chat template (vicuna_v1, llama3, ...; default: from the tokenizer)"
    )
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the verified output to this Hub repo")
    parser.add_argument("--private", action="store_true", help="create the Hub repo private")
    parser.add_argument("--no-verify", action="store_true", help="skip the verification")
    parser.add_argument("--verify-device", default="cpu", help="device of the verification runs (default cpu)")
    return parser.parse_args(argv)


# Marks a staging folder as this converter's: who writes it, for which output. A run killed before its `finally`
# (SIGKILL, power loss) leaves the folder behind; the next conversion to the same output removes it.
STAGING_MARKER = ".slime-conversion-staging.json"


def _staging_prefix(output: str) -> str:
    return f".{os.path.basename(output)}.tmp-"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # another user's process, or a pid this platform cannot check: treat as alive
    return True


def _folder_size(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(folder) for f in files)


def remove_stale_staging(output: str) -> None:
    """Removes the staging folders beside `output` that an interrupted conversion to it left, and says so. Only
    folders carrying this converter's marker, written on this host by a process that no longer runs, are removed
    (and empty ones: killed before the marker); any other leftover is named and left alone."""
    parent = os.path.dirname(output)
    if not os.path.isdir(parent):
        return
    host = socket.gethostname()
    for entry in sorted(os.listdir(parent)):
        folder = os.path.join(parent, entry)
        if not entry.startswith(_staging_prefix(output)) or not os.path.isdir(folder) or os.path.islink(folder):
            continue
        try:
            with open(os.path.join(folder, STAGING_MARKER), encoding="utf-8") as handle:
                owner = json.load(handle)
        except (OSError, ValueError):
            owner = None
        if owner is None and not os.listdir(folder):
            os.rmdir(folder)
            logger.warning(f"removed {folder}, an empty staging folder left by an interrupted conversion")
        elif not isinstance(owner, dict) or owner.get("output") != output:
            logger.warning(
                f"{folder} looks like a conversion's staging folder but carries no marker of this "
                "converter for this output: left in place (remove it yourself if it is a leftover)"
            )
        elif owner.get("host") != host:
            logger.warning(
                f"{folder} is the staging folder of a conversion on host {owner.get('host')!r} "
                f"(pid {owner.get('pid')}): left in place"
            )
        elif _process_alive(int(owner.get("pid", -1))):
            logger.warning(f"{folder} is being written by a running conversion (pid {owner['pid']}): left in place")
        else:
            size = _folder_size(folder)
            shutil.rmtree(folder)
            logger.warning(
                f"removed {folder} ({size / 2**20:.1f} MB), the staging folder left by an interrupted "
                f"conversion (pid {owner['pid']})"
            )


def convert(args: argparse.Namespace) -> dict:
    """Runs a conversion: prepare, write into a temporary folder beside the output, verify, move into place, push."""
    output = os.path.abspath(args.output)
    remove_stale_staging(output)
    if os.path.exists(output):
        raise ConversionError(f"the output {output} already exists; nothing was written (choose a new folder)")
    parse_size(args.max_shard_size)
    conversion = prepare(args)
    parent = os.path.dirname(output)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=_staging_prefix(output), dir=parent)
    report: dict = {"kind": conversion.kind}
    try:
        with open(os.path.join(staging, STAGING_MARKER), "w", encoding="utf-8") as handle:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(), "output": output}, handle)
        write_output(conversion, staging, args)
        if not args.no_verify:
            if conversion.kind in ("adapters", "stage"):
                verify_stage_checkpoint(conversion, staging)
            else:
                report.update(verify(conversion, staging, args))
        if os.path.exists(output):
            raise ConversionError(f"the output {output} appeared during the conversion; nothing was overwritten")
        os.remove(os.path.join(staging, STAGING_MARKER))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp creates the folder private
        os.rename(staging, output)
    finally:
        conversion.plan.close()
        if os.path.exists(staging):
            shutil.rmtree(staging, ignore_errors=True)
    logger.info(f"wrote {output}")
    if args.push_to_hub:
        push_to_hub(output, args.push_to_hub, args.private)
    return report


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 ok, 1 verification failed, 2 bad input, 130
    interrupted)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    # SIGTERM / SIGHUP (a scheduler's stop, a closed terminal) unwind like Ctrl-C, so the staging folder is removed.
    handlers = {}
    if threading.current_thread() is threading.main_thread():  # the only thread that may set signal handlers
        for number in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
            if number is not None:
                handlers[number] = signal.signal(number, _raise_interrupt)
    try:
        convert(args)
    except VerificationError as error:
        print(f"verification failed: {error}", file=sys.stderr)
        return 1
    except ValueError as error:  # ConversionError and the readers' ValueErrors: bad input
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
