"""VQAv2 test-dev (server submission, as convert_vqav2_for_submission.py) and val (local VQA accuracy)."""

import json
import os

from lmms_eval.tasks._task_utils.file_utils import generate_submission_file
from lmms_eval.tasks._task_utils.vqa_eval_metric import EvalAIAnswerProcessor
from lmms_eval.tasks.vqav2.utils import vqav2_doc_to_visual
from lmms_eval.tasks.vqav2.utils import vqav2_process_results as _vqav2_process_results
from loguru import logger

from slime_hf.evaluation.tasks.protocol import SHORT_ANSWER_PROMPT, short_answer_question


__all__ = [
    "vqav2_aggregate_submissions",
    "vqav2_doc_to_text",
    "vqav2_doc_to_visual",
    "vqav2_process_results_test",
    "vqav2_process_results_val",
]

TEST2015_QUESTIONS_ENV = "SLIME_VQAV2_TEST2015_QUESTIONS"


def vqav2_doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    kwargs = lmms_eval_specific_kwargs or {}
    return short_answer_question(doc["question"], kwargs.get("post_prompt", "\n" + SHORT_ANSWER_PROMPT))


def vqav2_process_results_val(doc: dict, results: list[str]) -> dict:
    return {"exact_match": _vqav2_process_results(doc, [results[0].strip()])["exact_match"]}


def vqav2_process_results_test(doc: dict, results: list[str]) -> dict:
    # convert_vqav2_for_submission.py: the full EvalAI answer processor on the decoded (stripped) answer.
    return {"submission": {"question_id": doc["question_id"], "answer": EvalAIAnswerProcessor()(results[0].strip())}}


def vqav2_aggregate_submissions(results: list[dict], args=None) -> None:
    answers = {item["question_id"]: item["answer"] for item in results}
    questions_file = os.environ.get(TEST2015_QUESTIONS_ENV)
    if questions_file:
        with open(questions_file) as f:
            test2015 = [json.loads(line)["question_id"] for line in f if line.strip()]
        submission = [{"question_id": qid, "answer": answers.get(qid, "")} for qid in test2015]
    else:
        submission = [{"question_id": qid, "answer": answer} for qid, answer in answers.items()]
        logger.warning(
            f"VQAv2: the submission lists the {len(answers)} answered questions only; EvalAI's test-dev phase expects "
            f"every test2015 question. Set {TEST2015_QUESTIONS_ENV} to llava_vqav2_mscoco_test2015.jsonl (LLaVA's eval "
            "data) to fill the others with empty answers as the original convert_vqav2_for_submission.py."
        )
    path = generate_submission_file("vqav2_test-dev2015_submission.json", args)
    with open(path, "w") as f:
        json.dump(submission, f)
    logger.info(f"VQAv2 test-dev submission (upload to EvalAI) saved to {path}")
