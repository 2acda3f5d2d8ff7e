"""Evaluation prompts equal the original SliME pipeline's, benchmark by benchmark.

For each benchmark a sample in the schema of its lmms-eval dataset goes through the package's task variant (its
`doc_to_text`, and `render_prompt` with the V and L fixture processors) and is compared with the prompt the original
builds, written out here with its source. The original pipeline is the eval script's
`qs = DEFAULT_IMAGE_TOKEN + '\\n' + qs` followed by `conv_templates[conv_mode]` (`vicuna_v1` for Vicuna releases,
`llama3` for Llama-3 ones, per scripts/{vicuna,llama}/eval/*.sh); `original_prompt` below restates those two steps from
yfzhang114/SliME at 5c89ec9 (llava/eval/model_vqa_loader.py, llava/conversation.py) and is itself pinned to literal
strings.

The protocol checks need only the package; the checks that the shipped YAML files wire the protocol into lmms-eval
(doc_to_text, doc_to_visual, generation settings, splits) need lmms-eval and run in `make test-eval`.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from slime_hf.evaluation.prompting import render_prompt
from slime_hf.evaluation.tasks import EXTRA_TASKS, PAPER_COLUMNS, PAPER_TASKS, TASKS_DIR, protocol
from slime_hf.processing_slime import SliMEProcessor


PROJECT_ROOT = Path(__file__).resolve().parents[2]
# The fixture models, as tests/conftest.py finds them (this folder's conftest shadows that module name).
FIXTURES = Path(os.environ.get("SLIME_FIXTURES", PROJECT_ROOT / "tests" / "fixtures" / "reference"))

# ---------------------------------------------------------------------------------------------------------------------
# The original pipeline (yfzhang114/SliME 5c89ec9)
# ---------------------------------------------------------------------------------------------------------------------

# llava/conversation.py conv_vicuna_v1: system, roles ("USER", "ASSISTANT"), SeparatorStyle.TWO, sep " ", sep2 "</s>".
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def original_prompt(conv_mode: str, text: str) -> str:
    """model_vqa_loader.py / model_vqa.py / model_vqa_mmbench.py / model_vqa_science.py / MMMU run_llava.py:
    `qs = "<image>" + "\\n" + text`, `conv.append_message(roles[0], qs)`, `conv.append_message(roles[1], None)`,
    `conv.get_prompt()`."""
    qs = "<image>" + "\n" + text
    if conv_mode == "vicuna_v1":
        # SeparatorStyle.TWO: system + sep, "ROLE: message" + sep for the user, a bare "ROLE:" for the None message.
        return VICUNA_SYSTEM + " " + "USER: " + qs + " " + "ASSISTANT:"
    if conv_mode == "llama3":
        # SeparatorStyle.LLAMA_3 (system turn commented out): the user turn with <|eot_id|>, then the bare header.
        return (
            "<|start_header_id|>user<|end_header_id|>\n\n" + qs + "<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n"
        )
    raise ValueError(conv_mode)


CONV_MODE = {"V": "vicuna_v1", "L": "llama3"}


@pytest.fixture(scope="module")
def processors() -> dict[str, SliMEProcessor]:
    return {variant: SliMEProcessor.from_pretrained(FIXTURES / variant / "checkpoint") for variant in CONV_MODE}


def test_original_prompt_is_the_original_conversation():
    # Literal prompts of the original for one question, as conv.get_prompt() prints them.
    assert original_prompt("vicuna_v1", "Q?") == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nQ? ASSISTANT:"
    )
    assert original_prompt("llama3", "Q?") == (
        "<|start_header_id|>user<|end_header_id|>\n\n<image>\nQ?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def assert_rendered(processors: dict[str, SliMEProcessor], question: str, num_images: int = 1) -> None:
    """The package's prompt for `question` equals the original pipeline's, for both template families."""
    for variant, processor in processors.items():
        assert render_prompt(processor, question, num_images) == original_prompt(CONV_MODE[variant], question)


# ---------------------------------------------------------------------------------------------------------------------
# lmms-eval wiring (make test-eval)
# ---------------------------------------------------------------------------------------------------------------------

HAS_LMMS_EVAL = importlib.util.find_spec("lmms_eval") is not None
requires_lmms_eval = pytest.mark.skipif(
    not HAS_LMMS_EVAL and os.environ.get("SLIME_EVAL_TESTS") != "1",
    reason="lmms-eval is not installed here; `make test-eval` runs these checks",
)

YAML = {
    "slime_textvqa_val": "textvqa/slime_textvqa_val.yaml",
    "slime_gqa": "gqa/slime_gqa.yaml",
    "slime_vqav2_testdev": "vqav2/slime_vqav2_testdev.yaml",
    "slime_vqav2_val": "vqav2/slime_vqav2_val.yaml",
    "slime_mmbench_en_dev": "mmbench/slime_mmbench_en_dev.yaml",
    "slime_mmbench_cn_dev": "mmbench/slime_mmbench_cn_dev.yaml",
    "slime_mmmu_val": "mmmu/slime_mmmu_val.yaml",
    "slime_llava_in_the_wild": "llava_in_the_wild/slime_llava_in_the_wild.yaml",
    "slime_mme": "mme/slime_mme.yaml",
    "slime_mmvet": "mmvet/slime_mmvet.yaml",
    "slime_pope": "pope/slime_pope.yaml",
    "slime_scienceqa_img": "scienceqa/slime_scienceqa_img.yaml",
    "slime_chartqa": "chartqa/slime_chartqa.yaml",
}


def load_task(task: str) -> dict:
    """The task's YAML as lmms-eval loads it (functions imported), with the kwargs lmms-eval hands doc_to_text."""
    from lmms_eval.utils import load_yaml_config

    config = load_yaml_config(str(TASKS_DIR / YAML[task]), mode="full")
    assert config["task"] == task
    kwargs = dict(config.get("lmms_eval_specific_kwargs") or {})
    kwargs.update(kwargs.get("default", {}))  # ConfigurableTask._prepare_model_specific_config for any model
    config["kwargs"] = kwargs
    return config


def assert_task(task: str, doc: dict, question: str, max_new_tokens: int, split: str, num_images: int = 1) -> None:
    """The shipped task gives `question` for `doc`, `num_images` images, greedy decoding and the original's budget."""
    config = load_task(task)
    assert config["doc_to_text"](doc, config["kwargs"]) == question
    visuals = config["doc_to_visual"](doc)
    assert len(visuals) == num_images and all(isinstance(v, Image.Image) for v in visuals)
    generation = config["generation_kwargs"]
    assert generation["max_new_tokens"] == max_new_tokens
    assert generation["temperature"] == 0 and generation["do_sample"] is False and generation["num_beams"] == 1
    # No stop strings: the original stops at the end-of-sequence token only (lmms-eval's default would be "\n\n").
    assert generation["until"] == []
    assert config["test_split"] == split
    assert config["output_type"] == "generate_until"


def image(color: tuple[int, int, int] = (200, 30, 30)) -> Image.Image:
    return Image.new("RGB", (48, 32), color)


# ---------------------------------------------------------------------------------------------------------------------
# TextVQA
# ---------------------------------------------------------------------------------------------------------------------

# scripts/vicuna/eval/textvqa.sh: model_vqa_loader on llava_textvqa_val_v051_ocr.jsonl (--temperature 0, SliME's
# default --max_new_tokens 64). The question file itself is LLaVA's eval data and was not readable here: its text is
# reconstructed from the documented 3-line format that LLaVA's llava/eval/eval_textvqa.py `prompt_processor` parses
# ("question\nReference OCR token: a, b\nAnswer ..."; a 2-line prompt when a sample has no OCR tokens).
TEXTVQA_DOC = {
    "question_id": 34602,
    "question": "what is the brand of this camera?",
    "ocr_tokens": ["DAKOTA", "DIGITAL", "Single-Use", "Camera"],
    "answers": ["dakota"] * 10,
    "image": image(),
}
TEXTVQA_QUESTION = (
    "what is the brand of this camera?\nReference OCR token: DAKOTA, DIGITAL, Single-Use, Camera\n"
    "Answer the question using a single word or phrase."
)


def test_textvqa_prompt(processors):
    assert protocol.textvqa_question(TEXTVQA_DOC["question"], TEXTVQA_DOC["ocr_tokens"]) == TEXTVQA_QUESTION
    assert protocol.textvqa_question("what time is it?", []) == (
        "what time is it?\nAnswer the question using a single word or phrase."
    )
    assert_rendered(processors, TEXTVQA_QUESTION)


@requires_lmms_eval
def test_textvqa_task():
    assert_task("slime_textvqa_val", TEXTVQA_DOC, TEXTVQA_QUESTION, 64, "validation")


# ---------------------------------------------------------------------------------------------------------------------
# GQA, VQAv2 (short-answer post-prompt from LLaVA's question files)
# ---------------------------------------------------------------------------------------------------------------------

# scripts/vicuna/eval/gqa.sh: llava_gqa_testdev_balanced.jsonl; scripts/vicuna/eval/vqav2.sh:
# llava_vqav2_mscoco_test-dev2015.jsonl. Both question files (not readable here) hold question + "\nAnswer the
# question using a single word or phrase.", LLaVA-1.5's documented short-answer format.
GQA_DOC = {"id": "201307251", "imageId": "n1", "question": "Is the sky dark?", "answer": "yes", "image": image()}
GQA_QUESTION = "Is the sky dark?\nAnswer the question using a single word or phrase."
VQAV2_DOC = {"question_id": 262148000, "question": "What is the man holding?", "image": image()}
VQAV2_QUESTION = "What is the man holding?\nAnswer the question using a single word or phrase."


def test_gqa_prompt_and_scoring(processors):
    assert protocol.short_answer_question(GQA_DOC["question"]) == GQA_QUESTION
    assert_rendered(processors, GQA_QUESTION)
    # scripts/convert_gqa_for_eval.py: text.rstrip('.').lower()
    assert protocol.gqa_prediction("Yes.") == "yes"
    assert protocol.gqa_prediction("Left side..") == "left side"


@requires_lmms_eval
def test_gqa_task():
    assert_task("slime_gqa", GQA_DOC, GQA_QUESTION, 64, "testdev")
    config = load_task("slime_gqa")
    assert config["dataset_name"] == "testdev_balanced_instructions"
    assert config["process_results"](GQA_DOC, [" Yes.\n"])["exact_match"] == 1.0
    assert config["process_results"](GQA_DOC, ["No"])["exact_match"] == 0.0


def test_vqav2_prompt(processors):
    assert protocol.short_answer_question(VQAV2_DOC["question"]) == VQAV2_QUESTION
    assert_rendered(processors, VQAV2_QUESTION)


@requires_lmms_eval
def test_vqav2_tasks(tmp_path, monkeypatch):
    assert_task("slime_vqav2_testdev", VQAV2_DOC, VQAV2_QUESTION, 64, "testdev")
    assert_task("slime_vqav2_val", VQAV2_DOC, VQAV2_QUESTION, 64, "validation")
    # convert_vqav2_for_submission.py: EvalAI's answer processor on the answer; every test2015 question listed, ""
    # for the ones outside test-dev.
    config = load_task("slime_vqav2_testdev")
    record = config["process_results"](VQAV2_DOC, ["Two dogs."])["submission"]
    assert record == {"question_id": 262148000, "answer": "2 dogs"}
    questions = tmp_path / "llava_vqav2_mscoco_test2015.jsonl"
    questions.write_text('{"question_id": 1}\n{"question_id": 262148000}\n')
    monkeypatch.setenv("SLIME_VQAV2_TEST2015_QUESTIONS", str(questions))
    aggregate = config["metric_list"][0]["aggregation"]
    aggregate([record], args=SimpleNamespace(output_path=str(tmp_path)))
    written = json.loads((tmp_path / "submissions" / "vqav2_test-dev2015_submission.json").read_text())
    assert written == [{"question_id": 1, "answer": ""}, {"question_id": 262148000, "answer": "2 dogs"}]


# ---------------------------------------------------------------------------------------------------------------------
# MMBench, MMBench-CN
# ---------------------------------------------------------------------------------------------------------------------

# llava/eval/model_vqa_mmbench.py with --single-pred-prompt (scripts/vicuna/eval/mmbench.sh on mmbench_dev_20230712,
# mmbench_cn.sh with --lang cn on mmbench_dev_cn_20231003): hint + "\n" when present, question, "\nA. option" per
# option up to the first missing one (A-D), then "\n" + the option-letter instruction; 1024 new tokens (hard-coded).
MMBENCH_DOC = {
    "index": 241,
    "question": "Which category does this image belong to?",
    "hint": "nan",
    "A": "Oil Paiting",
    "B": "Sketch",
    "C": "Digital art",
    "D": "Photo",
    "E": None,
    "answer": "D",
    "category": "image_style",
    "L2-category": "coarse_perception",
    "source": "MMBench",
    "split": "dev",
    "image": image(),
}
MMBENCH_QUESTION = (
    "Which category does this image belong to?\nA. Oil Paiting\nB. Sketch\nC. Digital art\nD. Photo\n"
    "Answer with the option's letter from the given choices directly."
)
MMBENCH_HINT_DOC = {
    **MMBENCH_DOC,
    "index": 242,
    "answer": "B",
    "hint": "The passage below describes an experiment.",
    "question": "Identify the question that the experiment can best answer.",
    "A": "Does temperature matter?",
    "B": "Does light matter?",
    "C": None,
    "D": "nan",
}
MMBENCH_HINT_QUESTION = (
    "The passage below describes an experiment.\nIdentify the question that the experiment can best answer.\n"
    "A. Does temperature matter?\nB. Does light matter?\nAnswer with the option's letter from the given choices "
    "directly."
)
MMBENCH_CN_DOC = {
    **MMBENCH_DOC,
    "question": "这张图片属于哪个类别？",
    "A": "油画",
    "B": "素描",
    "C": "数字艺术",
    "D": "照片",
}
MMBENCH_CN_QUESTION = "这张图片属于哪个类别？\nA. 油画\nB. 素描\nC. 数字艺术\nD. 照片\n请直接回答选项字母。"


def _options(doc: dict) -> dict:
    return {key: doc.get(key) for key in "ABCDE"}


def test_mmbench_prompt(processors):
    assert protocol.mmbench_question(MMBENCH_DOC["question"], "nan", _options(MMBENCH_DOC)) == MMBENCH_QUESTION
    assert protocol.mmbench_question(MMBENCH_DOC["question"], None, _options(MMBENCH_DOC)) == MMBENCH_QUESTION
    hint = MMBENCH_HINT_DOC
    assert protocol.mmbench_question(hint["question"], hint["hint"], _options(hint)) == MMBENCH_HINT_QUESTION
    # A fifth option is not read (all_options = ['A', 'B', 'C', 'D']).
    assert protocol.mmbench_question("Q?", None, {"A": "x", "B": "y", "C": "z", "D": "w", "E": "v"}) == (
        "Q?\nA. x\nB. y\nC. z\nD. w\nAnswer with the option's letter from the given choices directly."
    )
    assert_rendered(processors, MMBENCH_QUESTION)
    assert_rendered(processors, MMBENCH_HINT_QUESTION)


def test_mmbench_cn_prompt(processors):
    cn = "\n" + protocol.OPTION_LETTER_PROMPT_CN
    assert protocol.mmbench_question(MMBENCH_CN_DOC["question"], "nan", _options(MMBENCH_CN_DOC), cn) == (
        MMBENCH_CN_QUESTION
    )
    assert_rendered(processors, MMBENCH_CN_QUESTION)


@requires_lmms_eval
def test_mmbench_tasks(tmp_path):
    assert_task("slime_mmbench_en_dev", MMBENCH_DOC, MMBENCH_QUESTION, 1024, "dev")
    assert_task("slime_mmbench_en_dev", MMBENCH_HINT_DOC, MMBENCH_HINT_QUESTION, 1024, "dev")
    assert_task("slime_mmbench_cn_dev", MMBENCH_CN_DOC, MMBENCH_CN_QUESTION, 1024, "dev")
    assert load_task("slime_mmbench_en_dev")["dataset_name"] == "en"
    assert load_task("slime_mmbench_cn_dev")["dataset_name"] == "cn"
    # Scored locally (circular, rule-based; one right, one wrong) and the upload file written in the columns of
    # convert_mmbench_for_submission.py.
    config = load_task("slime_mmbench_en_dev")
    records = [config["process_results"](MMBENCH_DOC, ["D"]), config["process_results"](MMBENCH_HINT_DOC, ["A"])]
    args = SimpleNamespace(output_path=str(tmp_path))
    accuracy, submission = (metric["aggregation"] for metric in config["metric_list"])
    assert accuracy([r["accuracy"] for r in records], args=args) == 50.0
    submission([r["submission"] for r in records], args=args)
    import pandas as pd

    upload = pd.read_excel(tmp_path / "submissions" / "mmbench_en_dev_upload.xlsx")
    assert list(upload.columns) == ["index", "question", "A", "B", "C", "D", "prediction", "answer", "split"]
    assert upload["prediction"].tolist() == ["D", "A"]


# ---------------------------------------------------------------------------------------------------------------------
# MMMU
# ---------------------------------------------------------------------------------------------------------------------

# MMMU-Benchmark/MMMU bb0b95a, mmmu/utils/data_utils.py construct_prompt with mmmu/configs/llava1.5.yaml (folded YAML:
# "{}\n{}\nAnswer with the option's letter from the given choices directly." / "{}\nAnswer the question using a
# single word or phrase."), options "(A) option\n" each; process_single_sample keeps image_1 only, and
# mmmu/utils/model_utils.py puts "<image>\n" before the text and decodes 128 new tokens. SliME's mmmu.sh runs its
# copy of run_llava.py with --conv-mode (vicuna_v1 / llama3).
MMMU_DOC = {
    "id": "validation_Art_Theory_1",
    "question": "<image 1> Which art movement does this painting belong to? Compare with <image 2>.",
    "options": "['Baroque', 'Rococo', 'Cubism']",
    "question_type": "multiple-choice",
    "answer": "C",
    "image_1": image((10, 20, 30)),
    "image_2": image((40, 50, 60)),
    "image_3": None,
}
MMMU_QUESTION = (
    "<image 1> Which art movement does this painting belong to? Compare with <image 2>.\n(A) Baroque\n(B) Rococo\n"
    "(C) Cubism\n\nAnswer with the option's letter from the given choices directly."
)
MMMU_OPEN_DOC = {
    **MMMU_DOC,
    "id": "validation_Math_2",
    "question": "What is the area of the triangle in <image 1>?",
    "options": "[]",
    "question_type": "open",
    "answer": "6",
}
MMMU_OPEN_QUESTION = (
    "What is the area of the triangle in <image 1>?\nAnswer the question using a single word or phrase."
)


def test_mmmu_prompt(processors):
    assert protocol.mmmu_question(MMMU_DOC["question"], MMMU_DOC["options"], "multiple-choice") == MMMU_QUESTION
    assert protocol.mmmu_question(MMMU_OPEN_DOC["question"], "[]", "open") == MMMU_OPEN_QUESTION
    # One image placeholder before the text even though the question refers to two images.
    assert_rendered(processors, MMMU_QUESTION, num_images=1)
    assert_rendered(processors, MMMU_OPEN_QUESTION, num_images=1)
    with pytest.raises(ValueError, match="list literal"):
        protocol.mmmu_options("'Baroque'")


@requires_lmms_eval
def test_mmmu_task():
    # doc_to_visual gives image_1 only (the original's single image), never image_2.
    assert_task("slime_mmmu_val", MMMU_DOC, MMMU_QUESTION, 128, "validation", num_images=1)
    assert_task("slime_mmmu_val", MMMU_OPEN_DOC, MMMU_OPEN_QUESTION, 128, "validation", num_images=1)
    config = load_task("slime_mmmu_val")
    assert config["doc_to_visual"](MMMU_DOC)[0].getpixel((0, 0)) == (10, 20, 30)
    assert "doc_to_messages" not in config  # lmms-eval's interleaved chat path is not used
    parsed = config["process_results"](MMMU_DOC, ["C"])["mmmu_acc"]
    assert parsed["parsed_pred"] == ["C"] and parsed["answer"] == "C"


# ---------------------------------------------------------------------------------------------------------------------
# LLaVA-Bench in-the-wild, MM-Vet (GPT-judged)
# ---------------------------------------------------------------------------------------------------------------------

# scripts/vicuna/eval/llavabench.sh and mmvet.sh: llava/eval/model_vqa.py on questions.jsonl / llava-mm-vet.jsonl,
# whose `text` is the bare question (no post-prompt), 1024 new tokens (hard-coded), --temperature 0.
LLAVA_W_DOC = {
    "question_id": 0,
    "question": "What is the name of this famous sight in the photo?",
    "caption": "An aerial view of Diamond Head in the Hawaiian Islands.",
    "gpt_answer": "Diamond Head.",
    "category": "conv",
    "image": image(),
}
MMVET_DOC = {
    "question_id": "v1_0",
    "question": "What is x in the equation?",
    "answer": "-1 <AND> -5",
    "capability": "ocr,math",
    "image": image(),
}


def test_llava_in_the_wild_and_mmvet_prompts(processors):
    assert_rendered(processors, LLAVA_W_DOC["question"])
    assert_rendered(processors, MMVET_DOC["question"])


@requires_lmms_eval
def test_llava_in_the_wild_task(tmp_path, monkeypatch):
    assert_task("slime_llava_in_the_wild", LLAVA_W_DOC, LLAVA_W_DOC["question"], 1024, "train")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("AZURE_API_KEY", raising=False)
    config = load_task("slime_llava_in_the_wild")
    record = config["process_results"](LLAVA_W_DOC, ["  Diamond Head.\n"])["gpt_eval_llava_all"]
    # No judge configured: no score, the answers file in model_vqa.py's format.
    assert config["metric_list"][0]["aggregation"]([record], args=SimpleNamespace(output_path=str(tmp_path))) is None
    line = json.loads((tmp_path / "submissions" / "llava_in_the_wild_answers.jsonl").read_text())
    assert (line["question_id"], line["prompt"], line["text"]) == (0, LLAVA_W_DOC["question"], "Diamond Head.")


@requires_lmms_eval
def test_mmvet_task(tmp_path, monkeypatch):
    assert_task("slime_mmvet", MMVET_DOC, MMVET_DOC["question"], 1024, "test")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("AZURE_API_KEY", raising=False)
    config = load_task("slime_mmvet")
    record = config["process_results"](MMVET_DOC, ["x = -1 or -5 "])["gpt_eval_score"]
    assert config["metric_list"][0]["aggregation"]([record], args=SimpleNamespace(output_path=str(tmp_path))) is None
    # scripts/convert_mmvet_for_eval.py: {"v1_<id>": answer}
    assert json.loads((tmp_path / "submissions" / "mmvet_results.json").read_text()) == {"v1_0": "x = -1 or -5"}


@requires_lmms_eval
def test_gpt_judged_tasks_score_with_a_configured_judge(tmp_path, monkeypatch):
    # With a judge key, the tasks hand their records to lmms-eval's own judges (replaced here by fixed verdicts: no
    # network): LLaVA-W's review scores (reference 8, answer 9) give 9 / 8 = 112.5%, MM-Vet's grade 0.5 gives 50%.
    monkeypatch.setenv("OPENAI_API_KEY", "a-key")  # before the imports: lmms-eval's MM-Vet module makes its client
    from lmms_eval.tasks.mmvet import utils as mmvet_judge
    from lmms_eval.verifiers import VerifyResult

    llava_judge = importlib.import_module("lmms_eval.tasks.llava-in-the-wild.utils")  # not an identifier
    asked = []

    def review(**request):
        asked.append(request)
        return VerifyResult(score=0.9, is_correct=True, raw_output="8 9", metadata={"scores": [8, 9]})

    monkeypatch.setattr(llava_judge, "_get_pipeline", lambda: review)
    monkeypatch.setattr(mmvet_judge, "get_chat_response", lambda prompt, **kwargs: ("0.5", "judge"))
    args = SimpleNamespace(output_path=str(tmp_path))

    config = load_task("slime_llava_in_the_wild")
    record = config["process_results"](LLAVA_W_DOC, ["Diamond Head."])["gpt_eval_llava_all"]
    assert config["metric_list"][0]["aggregation"]([record], args=args) == 112.5
    assert asked[0]["question"] == LLAVA_W_DOC["question"] and asked[0]["prediction"] == "Diamond Head."
    assert LLAVA_W_DOC["caption"] in asked[0]["content"]

    config = load_task("slime_mmvet")
    record = config["process_results"](MMVET_DOC, ["x = -1 or -5"])["gpt_eval_score"]
    assert config["metric_list"][0]["aggregation"]([record], args=args) == 50.0


# ---------------------------------------------------------------------------------------------------------------------
# MME
# ---------------------------------------------------------------------------------------------------------------------

# scripts/vicuna/eval/mme.sh: model_vqa_loader on llava_mme.jsonl (not readable here). Its text is the MME question
# without " Please answer yes or no." plus "\nAnswer the question using a single word or phrase.": LLaVA's
# convert_answer_to_mme.py removes that post-prompt, strips, and appends " Please answer yes or no." (or with two
# spaces) to find the ground truth, so the file held the stripped question.
MME_DOC = {
    "question_id": "code_reasoning/0020.png",
    "question": "Is a c++ code shown in the picture? Please answer yes or no.",
    "answer": "Yes",
    "category": "code_reasoning",
    "image": image(),
}
MME_QUESTION = "Is a c++ code shown in the picture?\nAnswer the question using a single word or phrase."


def test_mme_prompt_and_scoring(processors):
    assert protocol.mme_question(MME_DOC["question"]) == MME_QUESTION
    # Some MME questions have two spaces before the instruction. The converter cannot tell whether the question file
    # kept one of them ("...? \nAnswer", lmms-eval's default) or none; the task strips both (see the tasks README).
    assert protocol.mme_question("Is this a cat?  Please answer yes or no.") == (
        "Is this a cat?\nAnswer the question using a single word or phrase."
    )
    assert_rendered(processors, MME_QUESTION)
    # MME eval_tool calculation.py parse_pred_ans (lower-cased answer; yes / no in the first 4 characters).
    assert [protocol.mme_answer(a) for a in ("Yes", "No.", "yes, it is", "There is", "y")] == [
        "yes",
        "no",
        "yes",
        "other",
        "other",
    ]


@requires_lmms_eval
def test_mme_task():
    assert_task("slime_mme", MME_DOC, MME_QUESTION, 64, "test")
    config = load_task("slime_mme")
    assert config["process_results"](MME_DOC, ["Yes"]) == {
        "mme_cognition_score": {"question_id": "code_reasoning/0020.png", "category": "code_reasoning", "score": 1.0}
    }


# ---------------------------------------------------------------------------------------------------------------------
# POPE, ScienceQA-IMG, ChartQA
# ---------------------------------------------------------------------------------------------------------------------

# scripts/vicuna/eval/pope.sh: model_vqa_loader on llava_pope_test.jsonl, --max_new_tokens 64; scored by
# llava/eval/eval_pope.py per category. The file is not readable here; a line of it quoted in third-party code reads
# {'question_id': 20003000, 'image': 'COCO_val2014_000000277289.jpg', 'text': 'Is there a chair in the image?\nAnswer
# the question using a single word or phrase.', 'category': 'popular'}.
POPE_DOC = {
    "question_id": "1",
    "question": "Is there a snowboard in the image?",
    "answer": "yes",
    "category": "adversarial",
    "image": image(),
}
POPE_QUESTION = "Is there a snowboard in the image?\nAnswer the question using a single word or phrase."


def test_pope_prompt_and_scoring(processors):
    assert protocol.short_answer_question(POPE_DOC["question"]) == POPE_QUESTION
    assert_rendered(processors, POPE_QUESTION)
    # eval_pope.py: first sentence, commas removed, "no" for the words No / not / no, "yes" otherwise.
    answers = ["Yes", "No", "No, there is not.", "There is not a dog.", "Nope", "Yes. No."]
    assert [protocol.pope_answer(a) for a in answers] == ["yes", "no", "no", "no", "yes", "yes"]
    metrics = protocol.pope_metrics(["yes", "yes", "no", "no"], ["yes", "no", "no", "yes"])
    assert metrics == {"accuracy": 0.5, "precision": 0.5, "recall": 0.5, "f1": 0.5, "yes_ratio": 0.5}


@requires_lmms_eval
def test_pope_task(tmp_path):
    assert_task("slime_pope", POPE_DOC, POPE_QUESTION, 64, "test")
    config = load_task("slime_pope")
    docs = [
        {**POPE_DOC, "question_id": str(i), "answer": label, "category": category}
        for i, (label, category) in enumerate([("yes", "random"), ("no", "random"), ("yes", "popular")])
    ]
    records = [config["process_results"](doc, [answer])["pope_f1"] for doc, answer in zip(docs, ["Yes", "Yes", "No"])]
    args = SimpleNamespace(output_path=str(tmp_path))
    # random: precision 1/2, recall 1, F1 2/3; popular: no positive prediction, F1 0 -> mean 1/3.
    assert config["metric_list"][0]["aggregation"](records, args=args) == pytest.approx(100 / 3)


# scripts/vicuna/eval/sqa.sh: llava/eval/model_vqa_science.py --single-pred-prompt on llava_test_CQM-A.json, whose
# `<image>` is removed and the text stripped, then "\n" + the option-letter instruction. The file is not readable
# here; its sample 18499, quoted in third-party code, is
# "<image>\nContext: <hint>\n<question>\nA. <choice>\nB. <choice>" (the layout lmms-eval's scienceqa_img builds
# too). The layout without a hint (no "Context:" line) is lmms-eval's, not seen in the file.
SQA_DOC = {
    "hint": "",
    "question": "Which of these states is farthest north?",
    "choices": ["West Virginia", "Louisiana", "Arizona", "Oklahoma"],
    "answer": 0,
    "image": image(),
}
SQA_QUESTION = (
    "Which of these states is farthest north?\nA. West Virginia\nB. Louisiana\nC. Arizona\nD. Oklahoma\n"
    "Answer with the option's letter from the given choices directly."
)
SQA_HINT_DOC = {
    **SQA_DOC,
    "hint": "Figure: Hawaii.",
    "question": "Which type of climate is shown?",
    "choices": ["tropical", "polar"],
}
SQA_HINT_QUESTION = (
    "Context: Figure: Hawaii.\nWhich type of climate is shown?\nA. tropical\nB. polar\n"
    "Answer with the option's letter from the given choices directly."
)


def test_scienceqa_prompt_and_scoring(processors):
    assert protocol.scienceqa_question(SQA_DOC["hint"], SQA_DOC["question"], SQA_DOC["choices"]) == SQA_QUESTION
    hint = SQA_HINT_DOC
    assert protocol.scienceqa_question(hint["hint"], hint["question"], hint["choices"]) == SQA_HINT_QUESTION
    assert_rendered(processors, SQA_QUESTION)
    assert_rendered(processors, SQA_HINT_QUESTION)
    # eval_science_qa.py: the letter, "X. ...", or one "The answer is X."; anything else (or a letter past the
    # choices) is wrong.
    answers = ["B", "C. Arizona", "The answer is D.", "Arizona", "E", "A.B"]
    assert [protocol.scienceqa_answer_index(a, 4) for a in answers] == [1, 2, 3, -1, -1, -1]


@requires_lmms_eval
def test_scienceqa_task():
    assert_task("slime_scienceqa_img", SQA_DOC, SQA_QUESTION, 1024, "test")
    assert_task("slime_scienceqa_img", SQA_HINT_DOC, SQA_HINT_QUESTION, 1024, "test")
    config = load_task("slime_scienceqa_img")
    assert config["dataset_name"] == "ScienceQA-IMG"
    assert config["process_results"](SQA_DOC, ["A"]) == {"accuracy": 1.0}


# llava/eval/model_vqa_chartqa.py (scripts/vicuna/eval/chartqa.sh): question + --test-prompt default
# "\nAnswer the question using a single word or phrase.", --max_new_tokens default 100; relaxed accuracy with the
# model's answer passed as `target` (relative change measured against the answer).
CHARTQA_DOC = {
    "question": "How many food item is shown in the bar graph?",
    "answer": "14",
    "type": "human_test",
    "image": image(),
}
CHARTQA_QUESTION = "How many food item is shown in the bar graph?\nAnswer the question using a single word or phrase."


def test_chartqa_prompt_and_scoring(processors):
    assert protocol.short_answer_question(CHARTQA_DOC["question"]) == CHARTQA_QUESTION
    assert_rendered(processors, CHARTQA_QUESTION)
    assert protocol.chartqa_relaxed_correct(" 14 ", "14")
    assert protocol.chartqa_relaxed_correct("Yes", ["no", "yes"])
    # 95 vs 100: |100 - 95| / 95 > 5% in the original's order (lmms-eval's order, / 100, would accept it).
    assert not protocol.chartqa_relaxed_correct("95", "100")
    assert protocol.chartqa_relaxed_correct("100", "105")
    assert protocol.chartqa_relaxed_correct("50%", "0.51")


@requires_lmms_eval
def test_chartqa_task():
    assert_task("slime_chartqa", CHARTQA_DOC, CHARTQA_QUESTION, 100, "test")
    config = load_task("slime_chartqa")
    assert config["process_results"](CHARTQA_DOC, ["14"]) == {"relaxed_overall": 1.0, "relaxed_human_split": 1.0}


# ---------------------------------------------------------------------------------------------------------------------
# The group and the task folder
# ---------------------------------------------------------------------------------------------------------------------


def test_protocol_budget_table_matches_the_tasks():
    # Every shipped task has a parity test above, and the protocol's budget table covers every benchmark.
    assert set(YAML) == set(PAPER_TASKS) | set(EXTRA_TASKS)
    assert sorted(p.relative_to(TASKS_DIR).as_posix() for p in TASKS_DIR.glob("*/*.yaml")) == sorted(YAML.values())
    assert set(protocol.MAX_NEW_TOKENS) == {
        "textvqa", "gqa", "vqav2", "mme", "pope", "mmbench", "llava_in_the_wild", "mmvet", "scienceqa", "chartqa",
        "mmmu",
    }  # fmt: skip


def test_every_task_file_is_shipped():
    # setup.py's package data for the tasks folder covers each YAML, utils.py and the README (the task folders are
    # not packages, so a file outside the patterns would be missing from a wheel).
    import ast

    setup = ast.parse((PROJECT_ROOT / "setup.py").read_text())
    call = next(n for n in ast.walk(setup) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    package_data = ast.literal_eval(next(k.value for k in call.keywords if k.arg == "package_data"))
    patterns = package_data["slime_hf.evaluation.tasks"]
    shipped = {path for pattern in patterns for path in TASKS_DIR.glob(pattern)}  # setuptools' glob semantics
    files = {p for p in TASKS_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    modules = {p for p in files if p.suffix == ".py" and p.parent == TASKS_DIR}  # the package's own modules
    assert len(files) > len(modules) and files - modules <= shipped, sorted(map(str, files - modules - shipped))


@requires_lmms_eval
def test_paper_group_is_registered_with_the_ten_columns():
    from lmms_eval.tasks import TaskManager
    from lmms_eval.utils import load_yaml_config

    group = load_yaml_config(str(TASKS_DIR / "paper.yaml"), mode="simple")
    assert group["group"] == "paper" and group["task"] == list(PAPER_TASKS)
    manager = TaskManager(include_path=str(TASKS_DIR))
    for name in [*PAPER_TASKS, *EXTRA_TASKS]:
        assert manager.task_index[name]["type"] == "task"
        assert Path(manager.task_index[name]["yaml_path"]).is_relative_to(TASKS_DIR)
    assert manager.task_index["paper"]["type"] == "group"
    assert Path(manager.task_index["paper"]["yaml_path"]) == TASKS_DIR / "paper.yaml"
    for task, yaml in YAML.items():
        benchmark = yaml.split("/")[0]
        assert load_task(task)["generation_kwargs"]["max_new_tokens"] == protocol.MAX_NEW_TOKENS[benchmark]


def test_paper_columns_are_the_papers_table():
    # The columns of the paper's main table in RELEASES.md, in order, each filled by a task of the group.
    releases = (PROJECT_ROOT.parent / "shared" / "docs" / "RELEASES.md").read_text()
    header = next(line for line in releases.splitlines() if line.startswith("| model (LLM) |"))
    assert [c.strip() for c in header.strip("|").split("|")[1:]] == list(PAPER_COLUMNS)
    assert {task for task, _, _ in PAPER_COLUMNS.values()} == set(PAPER_TASKS)


@requires_lmms_eval
def test_paper_columns_name_the_tasks_metrics():
    for column, (task, metric, _) in PAPER_COLUMNS.items():
        metrics = [entry["metric"] for entry in load_task(task)["metric_list"]]
        if column == "VQAv2":  # scored by the evaluation server only
            assert metric is None and metrics == ["submission"]
        else:
            assert metric in metrics, column


# ---------------------------------------------------------------------------------------------------------------------
# Through lmms-eval: the contexts the model receives and the files written (the variants the model tests do not run)
# ---------------------------------------------------------------------------------------------------------------------


def _variant_tasks(folder: Path) -> dict[str, list[str]]:
    """Writes one mini dataset (the samples above, in their benchmark's schema) and one task YAML including the
    package's task per variant; returns each mini task's expected contexts, in dataset order."""
    import datasets
    import yaml

    value, image_feature = datasets.Value, datasets.Image()
    string, integer = value("string"), value("int64")
    vqa_answers = [{"answer": "two", "answer_confidence": "yes", "answer_id": i} for i in range(1, 11)]
    vqa = ([{**VQAV2_DOC, "answer": "two", "answers": vqa_answers}], {
        "question_id": integer, "question": string, "answer": string, "image": image_feature,
        "answers": [{"answer": string, "answer_confidence": string, "answer_id": integer}],
    })  # fmt: skip
    mmbench_columns = {key: string for key in MMBENCH_CN_DOC if key not in ("index", "image")}
    specs = {
        "vqav2_testdev": ("vqav2/slime_vqav2_testdev.yaml", "testdev", *vqa, [VQAV2_QUESTION]),
        "vqav2_val": ("vqav2/slime_vqav2_val.yaml", "validation", *vqa, [VQAV2_QUESTION]),
        "mmbench_cn": (
            "mmbench/slime_mmbench_cn_dev.yaml", "dev",
            [{**MMBENCH_CN_DOC, "E": "nan"}], {**mmbench_columns, "index": integer, "image": image_feature},
            [MMBENCH_CN_QUESTION],
        ),
        "mmmu": (
            "mmmu/slime_mmmu_val.yaml", "validation", [MMMU_DOC, MMMU_OPEN_DOC],
            {**{key: string for key in ("id", "question", "options", "question_type", "answer")},
             **{f"image_{i}": image_feature for i in (1, 2, 3)}},
            [MMMU_QUESTION, MMMU_OPEN_QUESTION],
        ),
        "llava_w": (
            "llava_in_the_wild/slime_llava_in_the_wild.yaml", "train", [LLAVA_W_DOC],
            {**{key: string for key in ("question", "caption", "gpt_answer", "category")}, "question_id": integer,
             "image": image_feature},
            [LLAVA_W_DOC["question"]],
        ),
        "mmvet": (
            "mmvet/slime_mmvet.yaml", "test", [MMVET_DOC],
            {**{key: string for key in ("question_id", "question", "answer", "capability")}, "image": image_feature},
            [MMVET_DOC["question"]],
        ),
        "pope": (
            "pope/slime_pope.yaml", "test", [POPE_DOC],
            {**{key: string for key in ("question_id", "question", "answer", "category")}, "image": image_feature},
            [POPE_QUESTION],
        ),
        "scienceqa": (
            "scienceqa/slime_scienceqa_img.yaml", "test", [SQA_DOC, SQA_HINT_DOC],
            {"hint": string, "question": string, "choices": datasets.Sequence(string), "answer": integer,
             "image": image_feature},
            [SQA_QUESTION, SQA_HINT_QUESTION],
        ),
        "chartqa": (
            "chartqa/slime_chartqa.yaml", "test", [CHARTQA_DOC],
            {"question": string, "answer": string, "type": string, "image": image_feature},
            [CHARTQA_QUESTION],
        ),
    }  # fmt: skip
    expected = {}
    for name, (include, split, rows, features, contexts) in specs.items():
        data = folder / f"{name}.parquet"
        datasets.Dataset.from_list(rows, features=datasets.Features(features)).to_parquet(str(data))
        config = {
            "include": str(TASKS_DIR / include),
            "task": f"variant_{name}",
            "dataset_path": "parquet",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {split: str(data)}},
        }
        (folder / f"variant_{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
        expected[f"variant_{name}"] = contexts
    return expected


@requires_lmms_eval
@pytest.mark.slow
def test_variants_run_through_lmms_eval(tmp_path):
    # One lmms-eval run (slime_hf on the V fixture, answers cut at 4 tokens) over the nine variants that the model's
    # end-to-end tests do not run: lmms-eval hands the model exactly the original's question texts, the scorers and
    # aggregations run, and the official files are written.
    from mini_benchmarks import lmms_eval_command, read_samples, run

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    expected = _variant_tasks(tasks)
    output = tmp_path / "out"
    budget_log = tmp_path / "budget.jsonl"
    model_args = f"pretrained={FIXTURES / 'V' / 'checkpoint'},dtype=float32,budget_log={budget_log}"
    generation = ("--gen_kwargs", "max_new_tokens=4")
    no_judge = {"OPENAI_API_KEY": "", "AZURE_API_KEY": ""}
    run(lmms_eval_command(list(expected), tasks, output, "--model_args", model_args, *generation), env=no_judge)
    for task, contexts in expected.items():
        assert [sample["input"] for sample in read_samples(output, task)] == contexts, task
    # One image per question, MMMU included (image_1 only although the sample has image_2).
    records = [json.loads(line) for line in budget_log.read_text().splitlines()]
    assert len(records) == sum(map(len, expected.values()))
    assert all(len(record["images"]) == 1 for record in records)
    results = json.loads(next(output.rglob("*_results.json")).read_text())["results"]
    assert results["variant_pope"]["pope_f1,none"] in (0.0, 100.0)
    assert 0.0 <= results["variant_mmmu"]["mmmu_acc,none"] <= 1.0
    # No judge configured: no LLaVA-W or MM-Vet score.
    assert results["variant_llava_w"]["gpt_eval_llava_all,none"] is None
    assert results["variant_mmvet"]["gpt_eval_score,none"] is None
    submissions = output / "submissions"
    assert [a["question_id"] for a in json.loads((submissions / "vqav2_test-dev2015_submission.json").read_text())] == [
        VQAV2_DOC["question_id"]
    ]
    assert list(json.loads((submissions / "mmvet_results.json").read_text())) == ["v1_0"]
    assert json.loads((submissions / "llava_in_the_wild_answers.jsonl").read_text())["question_id"] == 0
    assert (submissions / "mmbench_cn_dev_upload.xlsx").stat().st_size > 0
    assert set(json.loads((submissions / "pope_metrics.json").read_text())) == {"adversarial"}
