"""LLaVA-Bench (in-the-wild): answers in model_vqa.py's format; the GPT review only when a judge is configured."""

import importlib
import json

from lmms_eval.tasks._task_utils.file_utils import generate_submission_file
from loguru import logger

from slime_hf.evaluation.tasks.judge import judge_configured


__all__ = ["llava_aggregate", "llava_doc_to_text", "llava_doc_to_visual", "llava_process_results"]

_DOC_FIELDS = ("question_id", "question", "caption", "gpt_answer", "category")


def llava_doc_to_visual(doc: dict) -> list:
    return [doc["image"].convert("RGB")]


def llava_doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    # questions.jsonl `text` is the bare question; model_vqa.py adds no post-prompt.
    kwargs = lmms_eval_specific_kwargs or {}
    return doc["question"] + kwargs.get("post_prompt", "")


def llava_process_results(doc: dict, results: list[str]) -> dict:
    record = {field: doc.get(field) for field in _DOC_FIELDS}
    record["answer"] = results[0].strip()  # model_vqa.py: decoded with .strip()
    return {"gpt_eval_llava_all": record}


def llava_aggregate(results: list[dict], args=None) -> float | None:
    path = generate_submission_file("llava_in_the_wild_answers.jsonl", args)
    with open(path, "w") as f:
        for record in results:
            line = {"question_id": record["question_id"], "prompt": record["question"], "text": record["answer"]}
            f.write(json.dumps({**line, "answer_id": None, "model_id": "slime_hf", "metadata": {}}) + "\n")
    logger.info(f"LLaVA-Bench (in-the-wild) answers (model_vqa.py format) saved to {path}")
    if not judge_configured():
        logger.warning(
            "LLaVA-Bench (in-the-wild) is scored by a GPT judge and none is configured (OPENAI_API_KEY, or "
            "API_TYPE=azure with AZURE_API_KEY; MODEL_VERSION picks the judge). To score as the paper: run LLaVA's "
            "llava/eval/eval_gpt_review_bench.py with --answer-list answers_gpt4.jsonl "
            f"{path} and the benchmark's questions.jsonl, context.jsonl and llava/eval/table/rule.json, then "
            "llava/eval/summarize_gpt_review.py on the review file."
        )
        return None
    # Imported here: lmms-eval's module sets up its judge at import (its folder name is not an identifier).
    judge = importlib.import_module("lmms_eval.tasks.llava-in-the-wild.utils")
    reviews = [judge.llava_process_results(record, [record["answer"]])["gpt_eval_llava_all"] for record in results]
    with open(generate_submission_file("llava_in_the_wild_reviews.json", args), "w") as f:
        json.dump(reviews, f)
    return judge.llava_all_aggregation(reviews)
