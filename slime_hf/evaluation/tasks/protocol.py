"""The original SliME evaluation protocol, per benchmark, in plain Python (no lmms-eval import).

Each `*_question` function builds the text the original put in its question file (or built in its eval script) for
one sample, from the fields of the benchmark's lmms-eval dataset; [`render_prompt`] then adds `<image>\\n` and the
conversation template. The answer parsers and metrics port the original scorers where lmms-eval's differ. The task
folders' `utils.py` wire these into lmms-eval; the parity tests call them directly.

Sources (yfzhang114/SliME at 5c89ec9, haotian-liu/LLaVA, MMMU-Benchmark/MMMU at bb0b95a) are named per function.
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."
"""The post-prompt of TextVQA, GQA, VQAv2, MME, POPE (question files) and ChartQA (`--test-prompt` default)."""

OPTION_LETTER_PROMPT = "Answer with the option's letter from the given choices directly."
"""`--single-pred-prompt` of model_vqa_mmbench.py / model_vqa_science.py, and MMMU's llava1.5.yaml."""

OPTION_LETTER_PROMPT_CN = "请直接回答选项字母。"
"""`--single-pred-prompt --lang cn` of model_vqa_mmbench.py (MMBench-CN)."""

MME_YES_NO_SUFFIX = "Please answer yes or no."

MAX_NEW_TOKENS: dict[str, int] = {
    # model_vqa_loader.py (SliME's default 64; pope.sh passes 64 explicitly)
    "textvqa": 64,
    "gqa": 64,
    "vqav2": 64,
    "mme": 64,
    "pope": 64,
    # hard-coded max_new_tokens=1024 in model_vqa_mmbench.py, model_vqa.py, model_vqa_science.py
    "mmbench": 1024,
    "llava_in_the_wild": 1024,
    "mmvet": 1024,
    "scienceqa": 1024,
    # model_vqa_chartqa.py default
    "chartqa": 100,
    # MMMU mmmu/utils/model_utils.py call_llava_engine_df
    "mmmu": 128,
}
"""The original's `max_new_tokens` per benchmark (greedy, temperature 0, one beam everywhere; see README)."""


# ---------------------------------------------------------------------------------------------------------------------
# Question text per benchmark
# ---------------------------------------------------------------------------------------------------------------------


def short_answer_question(question: str, post_prompt: str = "\n" + SHORT_ANSWER_PROMPT) -> str:
    """
    GQA, VQAv2, POPE and ChartQA: the question followed by the short-answer post-prompt.

    The LLaVA question files `llava_gqa_testdev_balanced.jsonl`, `llava_vqav2_mscoco_test-dev2015.jsonl` and
    `llava_pope_test.jsonl` hold `question + "\\nAnswer the question using a single word or phrase."` (LLaVA-1.5's
    documented short-answer format); model_vqa_chartqa.py appends the same string as its `--test-prompt` default.
    """
    return f"{question}{post_prompt}"


def textvqa_question(
    question: str, ocr_tokens: Sequence[str] | None, post_prompt: str = "\n" + SHORT_ANSWER_PROMPT
) -> str:
    """
    TextVQA as in `llava_textvqa_val_v051_ocr.jsonl`: question, reference OCR tokens, post-prompt.

    The question is kept as written (lmms-eval's default `capitalize()`s it, which also lower-cases the rest); the OCR
    line is `"\\nReference OCR token: " + ", ".join(tokens)` and is left out when a sample has no tokens, the 2-line
    prompt LLaVA's `eval_textvqa.py` `prompt_processor` also accepts.
    """
    text = question
    if ocr_tokens:
        text += "\nReference OCR token: " + ", ".join(str(token) for token in ocr_tokens)
    return text + post_prompt


def mme_question(question: str, post_prompt: str = "\n" + SHORT_ANSWER_PROMPT) -> str:
    """
    MME as in `llava_mme.jsonl`: the benchmark question without its " Please answer yes or no.", then the short-answer
    post-prompt. LLaVA's `convert_answer_to_mme.py` undoes this: it removes the post-prompt, strips, and appends
    " Please answer yes or no." (or with two spaces) to find the ground truth. Where the question has two spaces before
    the instruction, the converter cannot tell whether the file kept one; both are stripped here.
    """
    text = question.strip()
    if text.endswith(MME_YES_NO_SUFFIX):
        text = text[: -len(MME_YES_NO_SUFFIX)].rstrip()
    return text + post_prompt


def is_none(value: Any) -> bool:
    """model_vqa_mmbench.py `is_none`: None, NaN, and the strings "nan" / "none" (any case) count as missing."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.lower() in ("nan", "none")


MMBENCH_OPTIONS = ("A", "B", "C", "D")


def mmbench_question(
    question: str, hint: Any, options: Mapping[str, Any], post_prompt: str = "\n" + OPTION_LETTER_PROMPT
) -> str:
    """
    MMBench / MMBench-CN as model_vqa_mmbench.py (`--single-pred-prompt`, one round): `hint + "\\n"` when the hint is
    present, the question, then `"\\nA. option"` per option up to the first missing one (A to D only), then the
    option-letter post-prompt (`"\\n请直接回答选项字母。"` for `--lang cn`).
    """
    text = question if is_none(hint) else f"{hint}\n{question}"
    for letter in MMBENCH_OPTIONS:
        value = options.get(letter)
        if is_none(value):
            break
        text += f"\n{letter}. {value}"
    return text + post_prompt


def scienceqa_question(
    hint: str | None, question: str, choices: Sequence[str], post_prompt: str = "\n" + OPTION_LETTER_PROMPT
) -> str:
    """
    ScienceQA as `llava_test_CQM-A.json` + model_vqa_science.py `--single-pred-prompt`: `"Context: hint\\n"` when the
    hint is not empty, the question, `"\\nA. choice"` per choice; the original strips this text (after removing its
    `<image>`) and appends the option-letter post-prompt.
    """
    context = f"Context: {hint}\n" if hint else ""
    options = "\n".join(f"{chr(ord('A') + i)}. {choice}" for i, choice in enumerate(choices))
    return f"{context}{question}\n{options}".strip() + post_prompt


def mmmu_options(options: str | Sequence[str]) -> list[str]:
    """MMMU's `options` field: a Python list literal in the Hugging Face dataset (the original `eval`s it)."""
    if isinstance(options, str):
        parsed = ast.literal_eval(options)
        if not isinstance(parsed, list):
            raise ValueError(f"MMMU options must be a list literal, got {options!r}.")
        return [str(option) for option in parsed]
    return [str(option) for option in options]


def mmmu_question(
    question: str,
    options: str | Sequence[str],
    question_type: str,
    multiple_choice_prompt: str = OPTION_LETTER_PROMPT,
    open_ended_prompt: str = SHORT_ANSWER_PROMPT,
) -> str:
    """
    MMMU as `construct_prompt` (mmmu/utils/data_utils.py) with `configs/llava1.5.yaml`, whose folded YAML strings are
    `"{}\\n{}\\nAnswer with the option's letter from the given choices directly."` and
    `"{}\\nAnswer the question using a single word or phrase."`; options are `"(A) option\\n"` each, so a
    multiple-choice prompt has a blank line before the instruction. The `<image i>` references stay in the text.
    """
    if question_type == "multiple-choice":
        example = "".join(f"({chr(ord('A') + i)}) {option}\n" for i, option in enumerate(mmmu_options(options)))
        return f"{question}\n{example}\n{multiple_choice_prompt}"
    return f"{question}\n{open_ended_prompt}"


# ---------------------------------------------------------------------------------------------------------------------
# Answer parsing and metrics where the original's scorer differs from lmms-eval's
# ---------------------------------------------------------------------------------------------------------------------


def pope_answer(text: str) -> str:
    """llava/eval/eval_pope.py: first sentence, commas removed; "no" when it holds the word No / no / not."""
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_metrics(predictions: Iterable[str], labels: Iterable[str]) -> dict[str, float]:
    """llava/eval/eval_pope.py `eval_pope`: accuracy, precision, recall, F1 and yes ratio ("yes" is positive)."""
    pairs = [(p == "yes", t == "yes") for p, t in zip(predictions, labels, strict=True)]
    if not pairs:
        raise ValueError("POPE metrics need at least one answer.")
    tp = sum(p and t for p, t in pairs)
    fp = sum(p and not t for p, t in pairs)
    tn = sum(not p and not t for p, t in pairs)
    fn = sum(not p and t for p, t in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / len(pairs),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / len(pairs),
    }


def gqa_prediction(text: str) -> str:
    """scripts/convert_gqa_for_eval.py: `text.rstrip('.').lower()`, which GQA's eval.py compares with the answer."""
    return text.rstrip(".").lower()


SCIENCEQA_OPTIONS = ("A", "B", "C", "D", "E")


def scienceqa_answer_index(text: str, num_choices: int) -> int:
    """
    llava/eval/eval_science_qa.py: the letter alone, `"X. ..."`, or one `"The answer is X."`; -1 (wrong) otherwise.
    """
    if text in SCIENCEQA_OPTIONS:
        answer = text
    elif len(text) >= 3 and text[0] in SCIENCEQA_OPTIONS and text[1:3] == ". ":
        answer = text[0]
    else:
        found = re.findall(r"The answer is ([A-Z]).", text)
        answer = found[0] if len(found) == 1 else "FAILED"
    return SCIENCEQA_OPTIONS.index(answer) if answer in SCIENCEQA_OPTIONS[:num_choices] else -1


def _to_float(text: str) -> float | None:
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def chartqa_relaxed_correct(answer: str, annotations: str | Sequence[str], max_relative_change: float = 0.05) -> bool:
    """
    llava/eval/model_vqa_chartqa.py `evaluate_relaxed_accuracy`: correct against any annotation, numbers within 5%.

    The original calls `relaxed_correctness(answer.strip(), annotation)`, i.e. with the model's answer as `target`:
    the relative change is measured against the answer, not the annotation (lmms-eval divides by the annotation).
    Kept as the original.
    """
    if isinstance(annotations, str):
        annotations = [annotations]
    answer = answer.strip()
    for annotation in annotations:
        target, prediction = _to_float(answer), _to_float(annotation)
        if prediction is not None and target:
            if abs(prediction - target) / abs(target) <= max_relative_change:
                return True
        elif annotation.lower() == answer.lower():
            return True
    return False


def mme_answer(text: str) -> str:
    """MME eval_tool calculation.py `parse_pred_ans` on the lower-cased answer: yes / no / other."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    prefix = text[:4]
    if "yes" in prefix:
        return "yes"
    return "no" if "no" in prefix else "other"
