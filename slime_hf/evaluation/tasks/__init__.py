"""lmms-eval task variants with the original SliME evaluation protocol, and the group `paper`.

lmms-eval has no entry point for tasks: pass [`TASKS_DIR`] as `--include_path` (`python -m slime_hf.evaluate` does).
Each benchmark's folder holds its task YAML (task names start with `slime_`) and a `utils.py` that needs lmms-eval;
[`protocol`] holds the prompt and scoring rules in plain Python. See README.md in this folder for every benchmark's
protocol and source.
"""

from pathlib import Path


TASKS_DIR = Path(__file__).resolve().parent
"""The folder to pass to lmms-eval as `--include_path`."""

PAPER_GROUP = "paper"
"""The task group of the paper's main table."""

PAPER_TASKS: dict[str, str] = {
    "slime_textvqa_val": "TextVQA",
    "slime_gqa": "GQA",
    "slime_vqav2_testdev": "VQAv2",
    "slime_mmbench_en_dev": "MMB",
    "slime_mmbench_cn_dev": "MMB-CN",
    "slime_mmmu_val": "MMMU-val",
    "slime_llava_in_the_wild": "LLaVA-W",
    "slime_mme": "MME-P / MME-C",
    "slime_mmvet": "MM-Vet",
}
"""The group's tasks and the paper column(s) each fills (RELEASES.md)."""

PAPER_COLUMNS: dict[str, tuple[str, str | None, float]] = {
    "TextVQA": ("slime_textvqa_val", "exact_match", 100.0),
    "GQA": ("slime_gqa", "exact_match", 100.0),
    "VQAv2": ("slime_vqav2_testdev", None, 100.0),
    "MMB": ("slime_mmbench_en_dev", "accuracy", 1.0),
    "MMB-CN": ("slime_mmbench_cn_dev", "accuracy", 1.0),
    "MMMU-val": ("slime_mmmu_val", "mmmu_acc", 100.0),
    "LLaVA-W": ("slime_llava_in_the_wild", "gpt_eval_llava_all", 1.0),
    "MME-P": ("slime_mme", "mme_perception_score", 1.0),
    "MME-C": ("slime_mme", "mme_cognition_score", 1.0),
    "MM-Vet": ("slime_mmvet", "gpt_eval_score", 1.0),
}
"""Paper column (RELEASES.md) -> (task, lmms-eval metric, factor to the paper's scale). VQAv2 test-dev has no local
metric (EvalAI scores the submission file); LLaVA-W and MM-Vet report `None` without a configured GPT judge."""

EXTRA_TASKS: tuple[str, ...] = ("slime_vqav2_val", "slime_pope", "slime_scienceqa_img", "slime_chartqa")
"""Further variants with the original's protocol (VQAv2 val scored locally, POPE, ScienceQA-IMG, ChartQA)."""

__all__ = ["EXTRA_TASKS", "PAPER_COLUMNS", "PAPER_GROUP", "PAPER_TASKS", "TASKS_DIR"]
