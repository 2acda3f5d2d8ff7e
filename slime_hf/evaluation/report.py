"""The comparison table of `python -m slime_hf.evaluate`: lmms-eval's results next to the paper's numbers, with the
mean image-token budget per benchmark from the model's per-sample budget log."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .paper import PAPER_COLUMNS, PAPER_RESULTS


__all__ = ["budget_summary", "comparison_rows", "find_results_file", "to_markdown"]

_SKIPPED_METRICS = ("alias", "submission")


def budget_summary(log_files: Iterable[Path]) -> dict[str, dict[str, float]]:
    """
    Per task, the mean image-token budget of its samples, from `slime_hf`'s budget logs (one JSON line per request;
    several processes write one file each). A sample scored through several requests (multiple choice) counts once.

    Returns:
        `dict[str, dict]`: task -> `samples`, `images`, `mean_local_kept` and `mean_local_total` per image.
    """
    samples: dict[tuple, list[dict]] = {}
    for path in log_files:
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            if line.strip():
                record = json.loads(line)
                samples[(record["task"], record["split"], record["doc_id"])] = record["images"]
    summary: dict[str, dict[str, float]] = {}
    for (task, _, _), images in samples.items():
        entry = summary.setdefault(task, {"samples": 0, "images": 0, "local_kept": 0, "local_total": 0})
        entry["samples"] += 1
        entry["images"] += len(images)
        entry["local_kept"] += sum(image["local_kept"] for image in images)
        entry["local_total"] += sum(image["local_total"] for image in images)
    return {
        task: {
            "samples": entry["samples"],
            "images": entry["images"],
            "mean_local_kept": entry["local_kept"] / entry["images"] if entry["images"] else None,
            "mean_local_total": entry["local_total"] / entry["images"] if entry["images"] else None,
        }
        for task, entry in summary.items()
    }


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def comparison_rows(results: dict, budgets: dict[str, dict], release: str | None) -> list[dict]:
    """
    One row per paper column whose task ran, then one per numeric metric of every other task that ran.

    Args:
        results (`dict`): lmms-eval's `results` section (task -> `"metric,filter"` -> value).
        budgets (`dict`): [`budget_summary`]'s output.
        release (`str`, *optional*): a key of [`PAPER_RESULTS`] to compare with.

    Returns:
        `list[dict]`: `benchmark`, `task`, `metric`, `ours`, `paper`, `difference`, `mean_local_kept`,
        `mean_local_total`, `samples`, `note`.
    """
    paper = PAPER_RESULTS.get(release, {}) if release else {}
    rows, covered = [], set()

    def row(benchmark: str, task: str, metric: str, ours: float | None, reference: float | None, note: str) -> dict:
        budget = budgets.get(task, {})
        difference = ours - reference if ours is not None and reference is not None else None
        return {
            "benchmark": benchmark,
            "task": task,
            "metric": metric,
            "ours": ours,
            "paper": reference,
            "difference": difference,
            "mean_local_kept": budget.get("mean_local_kept"),
            "mean_local_total": budget.get("mean_local_total"),
            "samples": budget.get("samples"),
            "note": note,
        }

    for column in PAPER_COLUMNS:
        if column.task not in results:
            continue
        covered.add(column.task)
        value = _number(results[column.task].get(f"{column.metric},none"))
        ours = value * column.scale if value is not None else None
        note = column.note if ours is None else ""
        if ours is None and not note:
            note = "no score in lmms-eval's results"
        rows.append(row(column.label, column.task, column.metric, ours, paper.get(column.label), note))
    for task in sorted(set(results) - covered):
        for key, value in results[task].items():
            metric, _, _ = key.partition(",")
            if metric in _SKIPPED_METRICS or metric.endswith("_stderr") or "stderr" in metric:
                continue
            if _number(value) is not None:
                rows.append(row(task, task, metric, _number(value), None, ""))
    return rows


def _cell(value: Any, digits: int = 2) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:+.{digits}f}" if digits < 0 else f"{value:.{digits}f}"
    return str(value)


def to_markdown(rows: list[dict], release: str | None, model: str) -> str:
    """The rows as a Markdown table, with the release compared with (or why none is)."""
    reference = f"paper ({release})" if release else "paper"
    lines = [
        f"# SliME evaluation: `{model}`",
        "",
        f"Compared with: {release}" if release else "Compared with: no published release (pass --release)",
        "",
        f"| benchmark | task | metric | ours | {reference} | difference | mean kept local tokens per image | samples |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        kept = row["mean_local_kept"]
        kept_cell = f"{kept:.1f} of {row['mean_local_total']:.1f}" if kept is not None else "—"
        ours = _cell(row["ours"]) if row["ours"] is not None else (row["note"] or "—")
        difference = f"{row['difference']:+.2f}" if row["difference"] is not None else "—"
        lines.append(
            f"| {row['benchmark']} | {row['task']} | {row['metric']} | {ours} | {_cell(row['paper'])} | {difference} "
            f"| {kept_cell} | {_cell(row['samples'])} |"
        )
    return "\n".join(lines) + "\n"


def find_results_file(folder: Path) -> Path:
    """The newest lmms-eval `*_results.json` under `folder`."""
    files = sorted(Path(folder).rglob("*_results.json"), key=lambda path: path.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"lmms-eval wrote no results file under {folder}")
    return files[-1]
