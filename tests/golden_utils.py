"""Reading the model goldens (`{V,L}/model_goldens/`) into the package's inputs."""

from __future__ import annotations

import ast
import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from conftest import FIXTURES


ORIGINAL_IMAGE_ID = -200


def _json(value):
    """Golden fields are JSON values, JSON strings, or (for nested single-run records) Python literals."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return ast.literal_eval(value)


@lru_cache(maxsize=None)
def cases(variant: str) -> dict:
    return json.loads((FIXTURES / variant / "model_goldens" / "cases.json").read_text())


def case(variant: str, name: str) -> dict:
    return next(c for c in cases(variant)["cases"] if c["name"] == name)


@lru_cache(maxsize=None)
def _tensor_file(variant: str, filename: str) -> dict:
    return load_file(str(FIXTURES / variant / "model_goldens" / filename))


def tensor(variant: str, ref: str) -> torch.Tensor:
    """A golden tensor from a `"file::key"` reference."""
    filename, key = ref.split("::")
    return _tensor_file(variant, filename)[key]


@lru_cache(maxsize=None)
def _npz(path: str, key: str) -> np.ndarray:
    return np.load(path)[key]


def image_pixels(image: dict) -> np.ndarray:
    filename, key = image["pixel_values"].split("::")
    return _npz(str(FIXTURES / filename), key)


def golden_ids(raw, image_token_id: int) -> torch.Tensor:
    """Golden ids (-200 at images) with the package's image token id."""
    ids = torch.tensor(_json(raw))
    return ids.masked_fill(ids == ORIGINAL_IMAGE_ID, image_token_id)


def pixel_inputs(images: list[dict]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Golden pixels as (num_images, max_views, 3, 336, 336) zero-padded + image_sizes (height, width)."""
    if not images:
        return None, None
    arrays = [image_pixels(image) for image in images]
    pixel_values = torch.zeros(len(arrays), max(a.shape[0] for a in arrays), 3, 336, 336)
    for index, array in enumerate(arrays):
        pixel_values[index, : len(array)] = torch.from_numpy(array)
    sizes = torch.tensor([[h, w] for w, h in (image["size_wh"] for image in images)])
    return pixel_values, sizes


def selected(image: dict) -> list[int]:
    return _json(image["selected_indices"])


def singles(golden_case: dict) -> list[dict]:
    parsed = []
    for single in _json(golden_case["singles"]):
        parsed.append({k: _json(v) if isinstance(v, str) and v[:1] in "[{" else v for k, v in single.items()})
    return parsed


def left_pad(rows: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pads 1-D id rows into (ids, attention_mask)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        ids[index, width - len(row) :] = row
        mask[index, width - len(row) :] = 1
    return ids, mask


def checkpoint_dir(variant: str) -> Path:
    return FIXTURES / variant / "checkpoint"
