"""The SliME paper's main table and how lmms-eval's results line up with it.

The numbers are the authors' main results figure (arXiv 2406.08487; see the project's RELEASES.md). Each column names
the package task that reproduces it, the lmms-eval metric, and the factor that brings the metric to the paper's unit
(percent for accuracies, MME's summed scores as they are).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


__all__ = ["PAPER_COLUMNS", "PAPER_RESULTS", "PaperColumn", "release_from_config"]


@dataclass(frozen=True)
class PaperColumn:
    """One column of the paper's table: `label`, the package `task` and `metric` that give it, the `scale` to the
    paper's unit, and a `note` for columns no local scorer gives (server submission, GPT judge)."""

    label: str
    task: str
    metric: str
    scale: float = 1.0
    note: str = ""


PAPER_COLUMNS: tuple[PaperColumn, ...] = (
    PaperColumn("TextVQA", "slime_textvqa_val", "exact_match", 100.0),
    PaperColumn("GQA", "slime_gqa", "exact_match", 100.0),
    PaperColumn(
        "VQAv2", "slime_vqav2_testdev", "submission", note="test-dev is scored by the EvalAI server: submit the file"
    ),
    PaperColumn("MMB", "slime_mmbench_en_dev", "accuracy"),
    PaperColumn("MMB-CN", "slime_mmbench_cn_dev", "accuracy"),
    PaperColumn("MMMU-val", "slime_mmmu_val", "mmmu_acc", 100.0),
    PaperColumn("LLaVA-W", "slime_llava_in_the_wild", "gpt_eval_llava_all", note="scored only with a GPT judge"),
    PaperColumn("MME-P", "slime_mme", "mme_perception_score"),
    PaperColumn("MME-C", "slime_mme", "mme_cognition_score"),
    PaperColumn("MM-Vet", "slime_mmvet", "gpt_eval_score", note="scored only with a GPT judge"),
)
"""The ten columns of the paper's table, in its order."""

_PUBLISHED = {
    "SliME-7B": (64.39, 63.13, 80.32, 69.32, 61.85, 37.20, 76.10, 1544, 383, 35.40),
    "SliME-8B": (64.76, 63.94, 80.69, 75.00, 71.80, 41.20, 73.90, 1578, 337, 37.40),
    "SliME-13B": (66.11, 63.60, 80.43, 71.13, 65.20, 38.00, 73.10, 1606, 293, 41.20),
}
PAPER_RESULTS: dict[str, dict[str, float]] = {
    release: {column.label: float(value) for column, value in zip(PAPER_COLUMNS, values, strict=True)}
    for release, values in _PUBLISHED.items()
}
"""Published results per release (the 70B has none)."""

# (hidden size, layers, vocabulary) of each release's language model
_RELEASE_SHAPES = {(4096, 32, 32000): "SliME-7B", (4096, 32, 128256): "SliME-8B", (5120, 40, 32000): "SliME-13B"}


def release_from_config(config: Any) -> str | None:
    """
    The published release whose language model has this config's shape, or `None` (a fine-tune of a release keeps
    the release's shape, so it is compared with that release).

    Args:
        config ([`SliMEConfig`] or `dict`): the model's config (`text_config` with `hidden_size`,
            `num_hidden_layers`, `vocab_size`).
    """
    text = config.get("text_config") if isinstance(config, dict) else getattr(config, "text_config", None)
    if text is None:
        return None
    get = text.get if isinstance(text, dict) else lambda key: getattr(text, key, None)
    return _RELEASE_SHAPES.get((get("hidden_size"), get("num_hidden_layers"), get("vocab_size")))
