"""A streaming safetensors writer: shards are written tensor by tensor, never held in memory."""

from __future__ import annotations

import json
import os
import re
import struct

import torch
from tqdm.auto import tqdm

from ..checkpoints import SAFETENSORS_DTYPES
from .errors import ConversionError
from .plan import Plan, PlannedTensor


_SAFETENSORS_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}


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
