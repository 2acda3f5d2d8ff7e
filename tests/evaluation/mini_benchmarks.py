"""Mini benchmarks for the evaluation tests: a few samples per benchmark with the fixtures' images, in each benchmark's
own lmms-eval schema, written as local parquet files, and task YAMLs that include the package's task variants with the
data swapped for the local files (nothing is downloaded)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import datasets
import yaml
from PIL import Image

from slime_hf.evaluation import TASKS_DIR


FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "reference"
IMAGES = FIXTURES / "common" / "images"
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def image(name: str) -> Image.Image:
    with Image.open(IMAGES / name) as handle:
        return handle.convert("RGB")


def _write(rows: list[dict], features: dict, path: Path) -> Path:
    datasets.Dataset.from_list(rows, features=datasets.Features(features)).to_parquet(str(path))
    return path


_STRING = datasets.Value("string")

TEXTVQA_ROWS = [
    {
        "question_id": 34602,
        "question": "what is written on the sign?",
        "image_id": "t0",
        "image": "square_336.png",
        "answers": ["stop"] * 6 + ["stop sign"] * 4,
        "ocr_tokens": ["STOP", "ahead"],
    },
    {
        "question_id": 34603,
        "question": "what color is the banner?",
        "image_id": "t1",
        "image": "banner_3000x250.png",
        "answers": ["red"] * 10,
        "ocr_tokens": [],
    },
    {
        "question_id": 34604,
        "question": "how tall is the tower?",
        "image_id": "t2",
        "image": "tall_300x1200.png",
        "answers": ["tall"] * 5 + ["very tall"] * 5,
        "ocr_tokens": ["100", "m"],
    },
]

GQA_ROWS = [
    {"id": "g0", "imageId": "n0", "question": "Is the sky blue?", "answer": "yes", "fullAnswer": "Yes, it is."},
    {"id": "g1", "imageId": "n1", "question": "What is on the table?", "answer": "cup", "fullAnswer": "A cup."},
    {"id": "g2", "imageId": "n0", "question": "Which side is the tree on?", "answer": "left", "fullAnswer": "Left."},
]
GQA_IMAGES = {"n0": "wide_1344x672.png", "n1": "portrait_500x700.png"}

MME_ROWS = [
    {"question_id": "code_reasoning/0001.png", "category": "code_reasoning", "answer": "Yes"},
    {"question_id": "code_reasoning/0001.png", "category": "code_reasoning", "answer": "No"},
    {"question_id": "existence/0002.png", "category": "existence", "answer": "Yes"},
    {"question_id": "existence/0002.png", "category": "existence", "answer": "No"},
]
MME_QUESTIONS = [
    "Is the output of the code 3? Please answer yes or no.",
    "Is the output of the code 5? Please answer yes or no.",
    "Is there a dog in this image? Please answer yes or no.",
    "Is there a cat in this image? Please answer yes or no.",
]
MME_IMAGES = ["odd_337x211.png", "odd_337x211.png", "photo_2048x1536.png", "photo_2048x1536.png"]

MMBENCH_ROWS = [
    {
        "index": 0,
        "question": "What is the main color of the image?",
        "hint": "nan",
        "A": "gray",
        "B": "red",
        "C": "green",
        "D": "nan",
        "answer": "A",
        "category": "color",
        "l2-category": "attribute",
        "source": "mini",
        "split": "dev",
        "image": "gray_400x300.png",
    },
    {
        "index": 1,
        "question": "Which shape fits the picture best?",
        "hint": "Look at the whole image.",
        "A": "square",
        "B": "circle",
        "C": "triangle",
        "D": "line",
        "answer": "A",
        "category": "shape",
        "l2-category": "attribute",
        "source": "mini",
        "split": "dev",
        "image": "square_1000.png",
    },
]


def doc_images(task: str, doc_id: int) -> list[Image.Image]:
    """The images lmms-eval gives the model for sample `doc_id` of a mini task (rows keep their order)."""
    if task in ("mini_textvqa", "mini_choice"):
        names = [TEXTVQA_ROWS[doc_id]["image"]]
    elif task == "mini_gqa":
        names = [GQA_IMAGES[GQA_ROWS[doc_id]["imageId"]]]
    elif task == "mini_mme":
        names = [MME_IMAGES[doc_id]]
    elif task == "mini_mmbench_en":
        names = [MMBENCH_ROWS[doc_id]["image"]]
    else:
        raise ValueError(f"unknown mini task {task!r}")
    return [image(name) for name in names]


def _images_from_names(rows: list[dict]) -> list[dict]:
    return [{**row, "image": image(row["image"])} for row in rows]


def write_textvqa(folder: Path) -> Path:
    features = {
        "question_id": datasets.Value("int64"),
        "question": _STRING,
        "image_id": _STRING,
        "image": datasets.Image(),
        "answers": datasets.Sequence(_STRING),
        "ocr_tokens": datasets.Sequence(_STRING),
    }
    return _write(_images_from_names(TEXTVQA_ROWS), features, folder / "textvqa_validation.parquet")


def write_gqa(folder: Path) -> Path:
    """GQA's two tables: the instructions and (read by the mini task's process_docs) the images by id."""
    features = {name: _STRING for name in GQA_ROWS[0]}
    _write(
        [{"id": key, "image": image(name)} for key, name in GQA_IMAGES.items()],
        {"id": _STRING, "image": datasets.Image()},
        folder / "gqa_images.parquet",
    )
    return _write(GQA_ROWS, features, folder / "gqa_testdev.parquet")


def write_mme(folder: Path) -> Path:
    rows = [
        {**row, "question": question, "image": image(name)}
        for row, question, name in zip(MME_ROWS, MME_QUESTIONS, MME_IMAGES)
    ]
    features = {
        "question_id": _STRING,
        "image": datasets.Image(),
        "question": _STRING,
        "answer": _STRING,
        "category": _STRING,
    }
    return _write(rows, features, folder / "mme_test.parquet")


def write_mmbench(folder: Path) -> Path:
    features = {name: _STRING for name in MMBENCH_ROWS[0] if name not in ("index", "image")}
    features.update({"index": datasets.Value("int64"), "image": datasets.Image()})
    return _write(_images_from_names(MMBENCH_ROWS), features, folder / "mmbench_dev.parquet")


GQA_PROCESS_DOCS = '''"""GQA's process_docs on the local image table (the package's reads the Hub's)."""
from pathlib import Path

import datasets


def gqa_process_docs(dataset):
    images = datasets.load_dataset("parquet", data_files=str(Path(__file__).parent / "gqa_images.parquet"))["train"]
    by_id = {row["id"]: row["image"] for row in images}
    return dataset.map(lambda doc: {"image": by_id[doc["imageId"]]})
'''

LOGLIKELIHOOD_UTILS = '''"""Multiple choice (log-likelihood) on the TextVQA mini set: first answer and two others."""


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"] + "\\nAnswer the question using a single word or phrase."


def doc_to_choice(doc):
    return [doc["answers"][0], "blue", "nothing at all"]


def doc_to_target(doc):
    return 0
'''


LL_FUNCTIONS = ("doc_to_visual", "doc_to_text", "doc_to_choice", "doc_to_target")


def _task_yaml(
    name: str, include: Path | None, data_file: Path, split: str, functions: dict | None = None, **extra
) -> tuple[dict, dict]:
    """A task config (plain YAML values) and its `!function` entries (key -> module.function)."""
    config = {"task": name, "dataset_path": "parquet", "dataset_name": None}
    if include is not None:
        config = {"include": str(include), **config}
    config["dataset_kwargs"] = {"data_files": {split: str(data_file)}}
    config.update(extra)
    return config, functions or {}


PACKAGE_NAMES = {"mini_textvqa": "slime_textvqa_val", "mini_gqa": "slime_gqa", "mini_mme": "slime_mme"}


def write_mini_tasks(folder: Path, package_names: bool = False) -> dict[str, str]:
    """
    Writes the mini datasets and their task YAMLs into `folder` (pass it to lmms-eval as `--include_path`). With
    `package_names`, the benchmarks take the package tasks' names (ahead of the package's folder, they replace them).

    Returns:
        `dict[str, str]`: mini task name -> the package task it includes (or `"loglikelihood"`).
    """
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "mini_utils.py").write_text(GQA_PROCESS_DOCS)
    (folder / "ll_utils.py").write_text(LOGLIKELIHOOD_UTILS)
    configs = {
        "mini_textvqa": _task_yaml(
            "mini_textvqa", TASKS_DIR / "textvqa" / "slime_textvqa_val.yaml", write_textvqa(folder), "validation"
        ),
        "mini_gqa": _task_yaml(
            "mini_gqa",
            TASKS_DIR / "gqa" / "slime_gqa.yaml",
            write_gqa(folder),
            "testdev",
            functions={"process_docs": "mini_utils.gqa_process_docs"},
        ),
        "mini_mme": _task_yaml("mini_mme", TASKS_DIR / "mme" / "slime_mme.yaml", write_mme(folder), "test"),
        "mini_mmbench_en": _task_yaml(
            "mini_mmbench_en", TASKS_DIR / "mmbench" / "slime_mmbench_en_dev.yaml", write_mmbench(folder), "dev"
        ),
        "mini_choice": _task_yaml(
            "mini_choice",
            None,
            folder / "textvqa_validation.parquet",
            "validation",
            test_split="validation",
            functions={
                key: f"ll_utils.{key}" for key in ("doc_to_visual", "doc_to_text", "doc_to_choice", "doc_to_target")
            },
            output_type="multiple_choice",
            metric_list=[{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
            metadata={"version": 0.0},
        ),
    }
    if package_names:
        configs = {PACKAGE_NAMES.get(name, name): config for name, config in configs.items()}
        for name, (config, _) in configs.items():
            config["task"] = name
    for name, (config, functions) in configs.items():
        text = yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
        text += "".join(f"{key}: !function {target}\n" for key, target in functions.items())
        (folder / f"{name}.yaml").write_text(text)
    return {name: str(config.get("include", "loglikelihood")) for name, (config, _) in configs.items()}


def run(args: list[str], env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Runs a command offline from the project root; fails the test with its output when it fails."""
    import os

    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    result = subprocess.run(args, cwd=PROJECT_ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    # lmms-eval's command line logs a failed evaluation ("Error during evaluation") and still exits with status 0
    if result.returncode != 0 or "Error during evaluation" in result.stdout + result.stderr:
        raise AssertionError(
            f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
        )
    return result


def lmms_eval_command(tasks: list[str], include: Path, output: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "lmms_eval",
        "--model",
        "slime_hf",
        "--tasks",
        ",".join(tasks),
        "--include_path",
        str(include),
        "--output_path",
        str(output),
        "--log_samples",
        *extra,
    ]


def read_samples(output: Path, task: str) -> list[dict]:
    """The logged samples of `task` from an lmms-eval output folder (one JSON object per sample)."""
    files = sorted(output.rglob(f"*_samples_{task}.jsonl"))
    if len(files) != 1:
        raise AssertionError(f"expected one samples file for {task} under {output}, found {files}")
    return [json.loads(line) for line in files[0].read_text().splitlines() if line.strip()]


def read_results(output: Path) -> dict:
    files = sorted(output.rglob("*_results.json"))
    if len(files) != 1:
        raise AssertionError(f"expected one results file under {output}, found {files}")
    return json.loads(files[0].read_text())
