"""GQA testdev-balanced with the original's scoring (convert_gqa_for_eval.py + GQA eval.py exact match)."""

import json

from lmms_eval.tasks._task_utils.file_utils import generate_submission_file
from lmms_eval.tasks.gqa.utils import gqa_doc_to_visual, gqa_process_docs
from loguru import logger

from slime_hf.evaluation.tasks.protocol import SHORT_ANSWER_PROMPT, gqa_prediction, short_answer_question


__all__ = [
    "gqa_aggregate_submissions",
    "gqa_doc_to_text",
    "gqa_doc_to_visual",
    "gqa_process_docs",
    "gqa_process_results",
]


def gqa_doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    kwargs = lmms_eval_specific_kwargs or {}
    return short_answer_question(doc["question"], kwargs.get("post_prompt", "\n" + SHORT_ANSWER_PROMPT))


def gqa_process_results(doc: dict, results: list[str]) -> dict:
    prediction = gqa_prediction(results[0].strip())
    return {
        "exact_match": float(prediction == doc["answer"]),
        "submission": {"questionId": doc["id"], "prediction": prediction},
    }


def gqa_aggregate_submissions(results: list[dict], args=None) -> None:
    # The file GQA's eval.py reads (`testdev_balanced_predictions.json`), as convert_gqa_for_eval.py writes it.
    path = generate_submission_file("testdev_balanced_predictions.json", args)
    with open(path, "w") as f:
        json.dump(results, f)
    logger.info(f"GQA predictions (for GQA's eval.py) saved to {path}")
