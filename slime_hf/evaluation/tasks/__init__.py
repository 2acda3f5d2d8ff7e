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

EXTRA_TASKS: tuple[str, ...] = ("slime_vqav2_val", "slime_pope", "slime_scienceqa_img", "slime_chartqa")
"""Further variants with the original's protocol (VQAv2 val scored locally, POPE, ScienceQA-IMG, ChartQA)."""

__all__ = ["EXTRA_TASKS", "PAPER_GROUP", "PAPER_TASKS", "TASKS_DIR"]
