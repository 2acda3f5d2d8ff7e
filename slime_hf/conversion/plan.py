"""The tensor plan: every output tensor with its source, shape and dtype, checked before anything is read."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..checkpoints import (
    ADAPTER_PARTS,
    ADAPTER_PREFIXES,
    LoraAdapter,
    WeightFile,
    in_memory_name,
    strip_peft_prefix,
    to_package_name,
)
from ..configuration_slime import SliMEConfig
from ..modeling_slime import SliMEForConditionalGeneration, sincos_position_table
from .errors import ConversionError


logger = logging.getLogger("slime_hf.conversion")


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


def expected_tensors(config: SliMEConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shapes and dtypes of every weight of a model with this config (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = SliMEForConditionalGeneration(config)
    return {in_memory_name(k): (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


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
        unexpected = sorted(n for n in self.tensors if in_memory_name(n) not in expected)
        if unexpected:
            raise ConversionError(
                f"weights that a SliME model with this config does not have ({len(unexpected)}): {unexpected[:12]}"
            )
        for name, planned in self.tensors.items():
            shape = expected[in_memory_name(name)][0]
            if planned.shape != shape:
                raise ConversionError(
                    f"{name} from {planned.source} has shape {planned.shape}, the config says {shape}"
                )
        present = {in_memory_name(n) for n in self.tensors}
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
            raise ConversionError(missing_message(missing))

    def close(self) -> None:
        self.files.close()
        if self.lora is not None:
            self.lora.close()


def missing_message(missing: list[str]) -> str:
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
