"""MMBench / MMBench-CN dev with the original's prompt (model_vqa_mmbench.py) and its upload file."""

import json

import pandas as pd
from lmms_eval.tasks._task_utils.file_utils import generate_submission_file
from lmms_eval.tasks.mmbench.mmbench_evals import MMBench_Evaluator
from loguru import logger
from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE

from slime_hf.evaluation.tasks.protocol import OPTION_LETTER_PROMPT, mmbench_question


__all__ = [
    "mmbench_cn_aggregate_accuracy",
    "mmbench_cn_aggregate_submission",
    "mmbench_doc_to_text",
    "mmbench_doc_to_visual",
    "mmbench_en_aggregate_accuracy",
    "mmbench_en_aggregate_submission",
    "mmbench_process_results",
]

_OPTION_KEYS = ("A", "B", "C", "D", "E")
# convert_mmbench_for_submission.py drops hint, category, source, image, comment and l2-category from the dev tsv and
# inserts `prediction` as the 7th column: index, question, A, B, C, D, prediction, answer, split.
_UPLOAD_COLUMNS = ["index", "question", "A", "B", "C", "D", "prediction", "answer", "split"]


def mmbench_doc_to_visual(doc: dict) -> list:
    return [doc["image"].convert("RGB")]


def mmbench_doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    kwargs = lmms_eval_specific_kwargs or {}
    options = {key: doc.get(key) for key in _OPTION_KEYS}
    post_prompt = kwargs.get("post_prompt", "\n" + OPTION_LETTER_PROMPT)
    return mmbench_question(doc["question"], doc.get("hint"), options, post_prompt)


def mmbench_process_results(doc: dict, results: list[str]) -> dict:
    record = {
        "index": doc["index"],
        "question": doc["question"],
        "answer": doc["answer"],
        "prediction": results[0].strip(),
        "hint": doc.get("hint"),
        "source": doc.get("source"),
        "split": doc.get("split"),
        "category": doc.get("category"),
        "L2-category": doc.get("L2-category"),
    }
    record.update({key: doc.get(key, "nan") for key in _OPTION_KEYS})
    return {"accuracy": record, "submission": record}


def _accuracy(results: list[dict], name: str, args) -> float:
    # Circular evaluation over the dev rows (each question's rotated copies share index % 1e6), with lmms-eval's
    # rule-based answer extraction instead of the evaluation server's ChatGPT fallback.
    overall, categories, l2_categories = MMBench_Evaluator().eval_result(results, eval_method="static")
    path = generate_submission_file(f"{name}_dev_accuracy.json", args)
    with open(path, "w") as f:
        json.dump({"overall_acc": overall, "category_acc": categories, "l2_category_acc": l2_categories}, f)
    return overall * 100


def _submission(results: list[dict], name: str, args) -> None:
    frame = pd.DataFrame(results)
    for column in _UPLOAD_COLUMNS:
        if column not in frame.columns:
            frame[column] = None
    # Excel cells cannot hold control characters (an answer may contain some): they are left out of the upload file.
    frame["prediction"] = [ILLEGAL_CHARACTERS_RE.sub("", str(p)) if p is not None else p for p in frame["prediction"]]
    path = generate_submission_file(f"{name}_dev_upload.xlsx", args)
    frame[_UPLOAD_COLUMNS].to_excel(path, index=False, engine="openpyxl")
    logger.info(f"{name} dev upload file (as convert_mmbench_for_submission.py) saved to {path}")


def mmbench_en_aggregate_accuracy(results: list[dict], args=None) -> float:
    return _accuracy(results, "mmbench_en", args)


def mmbench_cn_aggregate_accuracy(results: list[dict], args=None) -> float:
    return _accuracy(results, "mmbench_cn", args)


def mmbench_en_aggregate_submission(results: list[dict], args=None) -> None:
    _submission(results, "mmbench_en", args)


def mmbench_cn_aggregate_submission(results: list[dict], args=None) -> None:
    _submission(results, "mmbench_cn", args)
