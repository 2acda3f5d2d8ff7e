"""MMMU val with the prompt and image handling of MMMU's run_llava.py (configs/llava1.5.yaml)."""

from lmms_eval.tasks.mmmu.utils import mmmu_aggregate_results
from lmms_eval.tasks.mmmu.utils import mmmu_process_results as _mmmu_process_results

from slime_hf.evaluation.tasks.protocol import OPTION_LETTER_PROMPT, SHORT_ANSWER_PROMPT, mmmu_question


__all__ = ["mmmu_aggregate_results", "mmmu_doc_to_text", "mmmu_doc_to_visual", "mmmu_process_results"]


def mmmu_doc_to_visual(doc: dict) -> list:
    # process_single_sample gives the model `image_1` only. (It would give none when options hold several
    # `<img='...'>` paths, a pattern the Hugging Face dataset never uses, so image_1 is always the image.)
    return [doc["image_1"].convert("RGB")]


def mmmu_doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    kwargs = lmms_eval_specific_kwargs or {}
    return mmmu_question(
        doc["question"],
        doc["options"],
        doc["question_type"],
        kwargs.get("multiple_choice_prompt", OPTION_LETTER_PROMPT),
        kwargs.get("open_ended_prompt", SHORT_ANSWER_PROMPT),
    )


def mmmu_process_results(doc: dict, results: list[str]) -> dict:
    # run_llava.py decodes only the new tokens, without strip; MMMU's parsers strip themselves.
    return {"mmmu_acc": _mmmu_process_results(doc, results)["mmmu_acc"]}
