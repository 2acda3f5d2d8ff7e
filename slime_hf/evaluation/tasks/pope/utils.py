"""POPE with the original's answer parsing and per-category metrics (llava/eval/eval_pope.py)."""

import json
from collections import defaultdict

from lmms_eval.tasks._task_utils.file_utils import generate_submission_file
from lmms_eval.tasks.pope.utils import pope_doc_to_visual
from loguru import logger

from slime_hf.evaluation.tasks.protocol import SHORT_ANSWER_PROMPT, pope_answer, pope_metrics, short_answer_question


__all__ = [
    "pope_aggregate_accuracy",
    "pope_aggregate_f1",
    "pope_doc_to_text",
    "pope_doc_to_visual",
    "pope_process_results",
]


def pope_doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    kwargs = lmms_eval_specific_kwargs or {}
    return short_answer_question(doc["question"], kwargs.get("post_prompt", "\n" + SHORT_ANSWER_PROMPT))


def pope_process_results(doc: dict, results: list[str]) -> dict:
    record = {
        "question_id": doc["question_id"],
        "category": doc.get("category", "all"),
        "prediction": pope_answer(results[0].strip()),
        "label": doc["answer"].lower().strip(),
    }
    return {"pope_f1": record, "pope_accuracy": record}


def _per_category(results: list[dict], args) -> dict[str, dict[str, float]]:
    by_category = defaultdict(list)
    for record in results:
        by_category[record["category"]].append(record)
    metrics = {
        category: pope_metrics([r["prediction"] for r in records], [r["label"] for r in records])
        for category, records in sorted(by_category.items())
    }
    with open(generate_submission_file("pope_metrics.json", args), "w") as f:
        json.dump(metrics, f, indent=2)
    for category, values in metrics.items():
        logger.info(f"POPE {category}: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
    return metrics


def pope_aggregate_f1(results: list[dict], args=None) -> float:
    metrics = _per_category(results, args)
    return 100 * sum(m["f1"] for m in metrics.values()) / len(metrics)


def pope_aggregate_accuracy(results: list[dict], args=None) -> float:
    metrics = _per_category(results, args)
    return 100 * sum(m["accuracy"] for m in metrics.values()) / len(metrics)
