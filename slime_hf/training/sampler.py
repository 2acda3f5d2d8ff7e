"""Upstream LLaVA's modality-grouped length sampler (opt-in: the SliME releases were trained with a plain
`RandomSampler`, because the original parsed `--group_by_modality_length` and never used it).

Image and text-only samples are shuffled separately and cut into mega-batches of `world_size * batch_size`; each
mega-batch is sorted by length and dealt into `world_size` chunks of balanced total length (one per rank, in the
order accelerate hands batches to ranks); the full mega-batches are shuffled together and the two leftover tails
form one last mega-batch. Unlike upstream, every shuffle uses the sampler's own generator, so all ranks agree.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


def _split_to_even_chunks(indices: list[int], lengths: Sequence[int], num_chunks: int) -> list[list[int]]:
    """Deals indices (longest first) into `num_chunks` chunks of equal size, each to the currently shortest one."""
    if len(indices) % num_chunks != 0:
        return [indices[i::num_chunks] for i in range(num_chunks)]
    per_chunk = len(indices) // num_chunks
    chunks: list[list[int]] = [[] for _ in range(num_chunks)]
    totals = [0.0] * num_chunks
    for index in indices:
        shortest = totals.index(min(totals))
        chunks[shortest].append(index)
        totals[shortest] += lengths[index]
        if len(chunks[shortest]) == per_chunk:
            totals[shortest] = float("inf")
    return chunks


def _megabatches(
    lengths: Sequence[int], batch_size: int, world_size: int, generator: torch.Generator | None
) -> list[list[int]]:
    """Shuffled indices cut into length-sorted, rank-balanced mega-batches (flattened per mega-batch)."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    size = world_size * batch_size
    out = []
    for start in range(0, len(order), size):
        megabatch = sorted(order[start : start + size], key=lambda i: lengths[i], reverse=True)
        out.append([i for chunk in _split_to_even_chunks(megabatch, lengths, world_size) for i in chunk])
    return out


def get_modality_length_grouped_indices(
    lengths: Sequence[int], batch_size: int, world_size: int, generator: torch.Generator | None = None
) -> list[int]:
    """
    The sample order of upstream LLaVA's modality-grouped sampler.

    Args:
        lengths (`Sequence[int]`): per sample, a length, positive for samples with images and negative for text-only
            ones (zero is not allowed).
        batch_size (`int`): per-device batch size (times gradient accumulation, as the Trainer passes it).
        world_size (`int`): number of data-parallel ranks.
        generator (`torch.Generator`, *optional*): the source of every shuffle.

    Returns:
        `list[int]`: a permutation of `range(len(lengths))`.
    """
    if any(length == 0 for length in lengths):
        raise ValueError("modality lengths must be non-zero (positive: with images, negative: text only)")
    if all(length > 0 for length in lengths) or all(length < 0 for length in lengths):
        magnitudes = [abs(length) for length in lengths]
        return [i for megabatch in _megabatches(magnitudes, batch_size, world_size, generator) for i in megabatch]
    groups = []
    for keep in (lambda length: length > 0, lambda length: length < 0):
        indices = [i for i, length in enumerate(lengths) if keep(length)]
        sub_lengths = [abs(lengths[i]) for i in indices]
        groups.append([[indices[i] for i in mb] for mb in _megabatches(sub_lengths, batch_size, world_size, generator)])
    image_megabatches, text_megabatches = groups
    tail = image_megabatches[-1] + text_megabatches[-1]
    full = image_megabatches[:-1] + text_megabatches[:-1]
    full = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
    if tail:
        full.append(sorted(tail))
    return [i for megabatch in full for i in megabatch]


class ModalityLengthGroupedSampler(Sampler[int]):
    """
    Samples so that each (mega-)batch holds one modality and similar lengths (see the module docstring). The order
    depends only on `seed` and the epoch, so a resumed run sees the same order.

    Args:
        lengths (`Sequence[int]`): [`SliMEDataset.modality_lengths`].
        batch_size (`int`): per-device batch size times gradient accumulation steps.
        world_size (`int`, *optional*, defaults to 1): data-parallel ranks.
        seed (`int`, *optional*, defaults to 0): seed of the shuffles (the Trainer's data seed).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, world_size: int = 1, seed: int = 0):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.world_size = world_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by accelerate at each epoch: a new, reproducible order."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_modality_length_grouped_indices(self.lengths, self.batch_size, self.world_size, generator))


__all__ = ["ModalityLengthGroupedSampler", "get_modality_length_grouped_indices"]
