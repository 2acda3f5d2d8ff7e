"""ScienceQA-IMG with the original's question format (llava_test_CQM-A.json) and scorer (eval_science_qa.py)."""

from lmms_eval.tasks.scienceqa.utils import sqa_doc_to_visual

from slime_hf.evaluation.tasks.protocol import OPTION_LETTER_PROMPT, scienceqa_answer_index, scienceqa_question


__all__ = ["sqa_doc_to_text", "sqa_doc_to_visual", "sqa_process_results"]


def sqa_doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    kwargs = lmms_eval_specific_kwargs or {}
    post_prompt = kwargs.get("post_prompt", "\n" + OPTION_LETTER_PROMPT)
    return scienceqa_question(doc["hint"], doc["question"], doc["choices"], post_prompt)


def sqa_process_results(doc: dict, results: list[str]) -> dict:
    return {"accuracy": float(scienceqa_answer_index(results[0].strip(), len(doc["choices"])) == doc["answer"])}
