"""MME with the original's question file format (llava_mme.jsonl) and MME's own answer parsing."""

from lmms_eval.tasks.mme.utils import eval_type_dict, mme_aggregate_results, mme_doc_to_visual

from slime_hf.evaluation.tasks.protocol import SHORT_ANSWER_PROMPT, mme_answer, mme_question


__all__ = ["mme_aggregate_results", "mme_doc_to_text", "mme_doc_to_visual", "mme_process_results"]


def mme_doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    kwargs = lmms_eval_specific_kwargs or {}
    return mme_question(doc["question"], kwargs.get("post_prompt", "\n" + SHORT_ANSWER_PROMPT))


def mme_process_results(doc: dict, results: list[str]) -> dict:
    # lmms-eval's aggregation is calculation.py's score (accuracy + accuracy+ per image pair); the answer parsing is
    # calculation.py's own (lmms-eval's also strips dots and maps a lone "y"/"n").
    score = float(mme_answer(results[0].strip()) == doc["answer"].lower())
    category = doc["category"]
    key = "mme_perception_score" if category in eval_type_dict["Perception"] else "mme_cognition_score"
    return {key: {"question_id": doc["question_id"], "category": category, "score": score}}
