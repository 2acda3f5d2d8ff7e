"""Shared fixtures of the evaluation tests: the mini benchmarks, one lmms-eval run per fixture variant (reused by the
tests that read it), and the fixture models loaded in the test process for the direct comparisons."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mini_benchmarks import FIXTURES, lmms_eval_command, run, write_mini_tasks

from slime_hf import SliMEForConditionalGeneration, SliMEProcessor


GENERATE_TASKS = ("mini_textvqa", "mini_gqa", "mini_mme", "mini_mmbench_en")
CHOICE_TASK = "mini_choice"
MAX_NEW_TOKENS = 12  # every task's own limit replaced (--gen_kwargs) to keep the CPU runs short
BATCH_SIZE = 2


def checkpoint(variant: str) -> Path:
    return FIXTURES / variant / "checkpoint"


@pytest.fixture(scope="session")
def mini_tasks(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("mini_tasks")
    write_mini_tasks(folder)
    return folder


@pytest.fixture(scope="session")
def lmms_eval_run(mini_tasks, tmp_path_factory):
    """`lmms_eval_run(variant)`: the output folder of one `python -m lmms_eval --model slime_hf` run over every mini
    task (batch size 2, budget log in `budget.jsonl` there), made once per variant."""
    outputs: dict[str, Path] = {}

    def get(variant: str) -> Path:
        if variant not in outputs:
            output = tmp_path_factory.mktemp(f"lmms_eval_{variant}")
            model_args = f"pretrained={checkpoint(variant)},dtype=float32,budget_log={output / 'budget.jsonl'}"
            run(
                lmms_eval_command(
                    [*GENERATE_TASKS, CHOICE_TASK],
                    mini_tasks,
                    output,
                    "--model_args",
                    model_args,
                    "--batch_size",
                    str(BATCH_SIZE),
                    "--gen_kwargs",
                    f"max_new_tokens={MAX_NEW_TOKENS}",
                )
            )
            outputs[variant] = output
        return outputs[variant]

    return get


@pytest.fixture(scope="session")
def loaded():
    """`loaded(variant)`: the fixture model (float32, eval mode) and its processor, loaded once per variant."""
    cache: dict[str, tuple] = {}

    def get(variant: str):
        if variant not in cache:
            model = SliMEForConditionalGeneration.from_pretrained(checkpoint(variant), dtype=torch.float32).eval()
            cache[variant] = (model, SliMEProcessor.from_pretrained(checkpoint(variant)))
        return cache[variant]

    return get
