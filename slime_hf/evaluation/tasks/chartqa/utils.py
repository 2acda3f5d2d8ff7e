"""ChartQA with the original's prompt and relaxed accuracy (llava/eval/model_vqa_chartqa.py)."""

from lmms_eval.tasks.chartqa.utils import chartqa_doc_to_visual

from slime_hf.evaluation.tasks.protocol import SHORT_ANSWER_PROMPT, chartqa_relaxed_correct, short_answer_question


__all__ = ["chartqa_doc_to_text", "chartqa_doc_to_visual", "chartqa_process_results"]


def chartqa_doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    kwargs = lmms_eval_specific_kwargs or {}
    return short_answer_question(doc["question"], kwargs.get("post_prompt", "\n" + SHORT_ANSWER_PROMPT))


def chartqa_process_results(doc: dict, results: list[str]) -> dict:
    score = float(chartqa_relaxed_correct(results[0], doc["answer"]))
    split = "relaxed_human_split" if doc.get("type") == "human_test" else "relaxed_augmented_split"
    return {"relaxed_overall": score, split: score}
