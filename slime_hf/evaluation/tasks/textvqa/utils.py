"""TextVQA val with the original's question file format (reference OCR tokens, question as written)."""

from lmms_eval.tasks.textvqa.utils import textvqa_aggregate_submissions, textvqa_doc_to_visual
from lmms_eval.tasks.textvqa.utils import textvqa_process_results as _textvqa_process_results

from slime_hf.evaluation.tasks.protocol import SHORT_ANSWER_PROMPT, textvqa_question


__all__ = ["textvqa_aggregate_submissions", "textvqa_doc_to_text", "textvqa_doc_to_visual", "textvqa_process_results"]


def textvqa_doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    kwargs = lmms_eval_specific_kwargs or {}
    ocr_tokens = doc.get("ocr_tokens") if kwargs.get("ocr", True) else None
    return textvqa_question(doc["question"], ocr_tokens, kwargs.get("post_prompt", "\n" + SHORT_ANSWER_PROMPT))


def textvqa_process_results(doc: dict, results: list[str]) -> dict:
    # The original decodes with .strip(); lmms-eval's scorer is the same TextVQA (m4c) accuracy as eval_textvqa.py.
    return _textvqa_process_results(doc, [results[0].strip()])
