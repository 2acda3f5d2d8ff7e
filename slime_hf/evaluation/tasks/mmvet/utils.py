"""MM-Vet: answers in the official grader's format; GPT grading only when a judge is configured."""

import json

from lmms_eval.tasks._task_utils.file_utils import generate_submission_file
from loguru import logger

from slime_hf.evaluation.tasks.judge import judge_configured


__all__ = ["mmvet_aggregate", "mmvet_doc_to_text", "mmvet_doc_to_visual", "mmvet_process_results", "mmvet_result_key"]

_DOC_FIELDS = ("question_id", "question", "answer", "capability")


def mmvet_doc_to_visual(doc: dict) -> list:
    return [] if doc["image"] is None else [doc["image"].convert("RGB")]


def mmvet_doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    # llava-mm-vet.jsonl `text` is the bare MM-Vet question; model_vqa.py adds no pre- or post-prompt.
    kwargs = lmms_eval_specific_kwargs or {}
    return kwargs.get("pre_prompt", "") + doc["question"] + kwargs.get("post_prompt", "")


def mmvet_result_key(question_id) -> str:
    """convert_mmvet_for_eval.py names each answer `v1_<question_id>` (MM-Vet's own ids)."""
    question_id = str(question_id)
    return question_id if question_id.startswith("v1_") else f"v1_{question_id}"


def mmvet_process_results(doc: dict, results: list[str]) -> dict:
    record = {field: doc.get(field) for field in _DOC_FIELDS}
    record["prediction"] = results[0].strip()  # model_vqa.py: decoded with .strip()
    return {"gpt_eval_score": record}


def mmvet_aggregate(results: list[dict], args=None) -> float | None:
    path = generate_submission_file("mmvet_results.json", args)
    with open(path, "w") as f:
        json.dump({mmvet_result_key(r["question_id"]): r["prediction"] for r in results}, f, indent=2)
    logger.info(f"MM-Vet answers (the grader's input format) saved to {path}")
    if not judge_configured():
        logger.warning(
            "MM-Vet is scored by a GPT grader and none is configured (OPENAI_API_KEY, or API_TYPE=azure with "
            "AZURE_API_KEY; MODEL_VERSION picks the judge). To score as the paper: upload "
            f"{path} to the MM-Vet evaluator (huggingface.co/spaces/whyu/MM-Vet_Evaluator) or run MM-Vet's "
            "mm-vet_evaluator.py on it."
        )
        return None
    # Imported here: lmms-eval's module sets up its judge client at import.
    from lmms_eval.tasks.mmvet import utils as judge

    graded = [judge.mmvet_process_results(record, [record["prediction"]])["gpt_eval_score"] for record in results]
    with open(generate_submission_file("mmvet_grades.json", args), "w") as f:
        json.dump(graded, f)
    return judge.mmvet_aggregate_results(graded)
