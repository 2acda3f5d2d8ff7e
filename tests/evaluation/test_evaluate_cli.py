"""`python -m slime_hf.evaluate` on the V fixture: lmms-eval's scores next to the paper's row with the difference and
the mean kept local tokens per benchmark (Markdown + JSON); the same answers with two data-parallel CPU processes
(torchrun, gloo); the release read from the model's size; bad input named in one line."""

from __future__ import annotations

import json
import sys

import pytest
from mini_benchmarks import PACKAGE_NAMES, read_samples, run, write_mini_tasks

from conftest import MAX_NEW_TOKENS, checkpoint
from slime_hf.evaluation.paper import PAPER_COLUMNS, PAPER_RESULTS, release_from_config
from slime_hf.evaluation.report import budget_summary


TASKS = [*PACKAGE_NAMES.values(), "mini_choice"]


@pytest.fixture(scope="module")
def package_named_tasks(tmp_path_factory):
    """The mini benchmarks under the package tasks' names (`--include_path` puts them ahead of the package's)."""
    folder = tmp_path_factory.mktemp("package_named_tasks")
    write_mini_tasks(folder, package_names=True)
    return folder


def answer(sample: dict) -> str:
    return sample.get("resps", sample["filtered_resps"])  # `resps` is logged where lmms-eval's filters changed it


def evaluate(tasks_folder, output, *extra: str):
    return run(
        [
            sys.executable,
            "-m",
            "slime_hf.evaluate",
            "--model",
            str(checkpoint("V")),
            "--tasks",
            ",".join(TASKS),
            "--include_path",
            str(tasks_folder),
            "--release",
            "SliME-7B",
            "--batch_size",
            "2",
            "--gen_kwargs",
            f"max_new_tokens={MAX_NEW_TOKENS}",
            "--output",
            str(output),
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def single_process(package_named_tasks, tmp_path_factory):
    output = tmp_path_factory.mktemp("evaluate_single")
    result = evaluate(package_named_tasks, output)
    return output, result.stdout


def test_table_against_the_paper(single_process):
    output, stdout = single_process
    report = json.loads((output / "results.json").read_text())
    lmms_eval = json.loads(open(report["lmms_eval_results"]).read())["results"]
    budgets = budget_summary([output / "token_budget.jsonl"])
    assert report["release"] == "SliME-7B"
    rows = {row["benchmark"]: row for row in report["rows"]}
    paper = PAPER_RESULTS["SliME-7B"]
    for label, task, metric, scale in (
        ("TextVQA", "slime_textvqa_val", "exact_match", 100),
        ("GQA", "slime_gqa", "exact_match", 100),
        ("MME-P", "slime_mme", "mme_perception_score", 1),
        ("MME-C", "slime_mme", "mme_cognition_score", 1),
    ):
        row = rows[label]
        assert row["task"] == task and row["paper"] == paper[label]
        assert row["ours"] == pytest.approx(lmms_eval[task][f"{metric},none"] * scale)
        assert row["difference"] == pytest.approx(row["ours"] - paper[label])
        assert row["samples"] == len(read_samples(output / "lmms_eval", task))
    # the mean kept local tokens per benchmark, from the per-sample budgets
    for task in TASKS:
        records = [json.loads(line) for line in (output / "token_budget.jsonl").read_text().splitlines()]
        kept = {(r["doc_id"]): [image["local_kept"] for image in r["images"]] for r in records if r["task"] == task}
        images = [count for counts in kept.values() for count in counts]
        assert budgets[task]["mean_local_kept"] == pytest.approx(sum(images) / len(images))
    assert rows["TextVQA"]["mean_local_kept"] == budgets["slime_textvqa_val"]["mean_local_kept"]
    assert "mini_choice" in rows and rows["mini_choice"]["paper"] is None
    # the columns that did not run are not in the table
    assert {row["benchmark"] for row in report["rows"]} == {"TextVQA", "GQA", "MME-P", "MME-C", "mini_choice"}
    markdown = (output / "results.md").read_text()
    assert "| TextVQA | slime_textvqa_val | exact_match |" in markdown and "paper (SliME-7B)" in markdown
    assert f"{paper['TextVQA']:.2f}" in markdown and markdown in stdout


@pytest.mark.slow
def test_two_processes_give_the_same_answers(single_process, package_named_tasks, tmp_path):
    single, _ = single_process
    evaluate(package_named_tasks, tmp_path, "--num_processes", "2")
    ranks = sorted(tmp_path.glob("token_budget.jsonl.rank*"))
    assert [path.name for path in ranks] == ["token_budget.jsonl.rank0", "token_budget.jsonl.rank1"]
    assert all(path.read_text() for path in ranks)  # both processes answered
    assert budget_summary(ranks) == budget_summary([single / "token_budget.jsonl"])
    for task in TASKS:
        one = {s["doc_id"]: s for s in read_samples(single / "lmms_eval", task)}
        two = {s["doc_id"]: s for s in read_samples(tmp_path / "lmms_eval", task)}
        assert one.keys() == two.keys()
        for doc_id, sample in one.items():
            if task == "mini_choice":
                for (a, greedy_a), (b, greedy_b) in zip(sample["filtered_resps"], two[doc_id]["filtered_resps"]):
                    assert abs(float(a) - float(b)) <= 1e-5 and greedy_a == greedy_b
            else:
                assert answer(sample) == answer(two[doc_id]), (task, doc_id)
    rows_one = json.loads((single / "results.json").read_text())["rows"]
    rows_two = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [(r["benchmark"], r["ours"]) for r in rows_one] == [(r["benchmark"], r["ours"]) for r in rows_two]


def test_release_from_the_model_size():
    def config(hidden, layers, vocab):
        return {"text_config": {"hidden_size": hidden, "num_hidden_layers": layers, "vocab_size": vocab}}

    assert release_from_config(config(4096, 32, 32000)) == "SliME-7B"
    assert release_from_config(config(4096, 32, 128256)) == "SliME-8B"
    assert release_from_config(config(5120, 40, 32000)) == "SliME-13B"
    assert release_from_config(config(64, 2, 1000)) is None
    assert [column.label for column in PAPER_COLUMNS] == list(PAPER_RESULTS["SliME-13B"])


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--release", "SliME-1B"], "--release 'SliME-1B': choose one of SliME-7B, SliME-8B, SliME-13B or none"),
        (["--limit", "0"], "--limit must be positive, got 0.0"),
        (["--include_path", "/nonexistent/tasks"], "--include_path /nonexistent/tasks: not a folder"),
        (["--model", "/nonexistent/model"], "--model /nonexistent/model: no such folder"),
    ],
)
def test_bad_input_is_one_line(arguments, message, tmp_path, capsys):
    from slime_hf.evaluate import main

    status = main(["--model", str(checkpoint("V")), "--output", str(tmp_path), *arguments])
    error = capsys.readouterr().err
    assert status == 2 and error == f"error: {message}\n"


def test_every_paper_column_is_a_package_task_of_the_group_paper():
    from lmms_eval.tasks import TaskManager
    from lmms_eval.utils import load_yaml_config

    from slime_hf.evaluation import TASKS_DIR

    manager = TaskManager("ERROR", include_path=str(TASKS_DIR))
    assert "paper" in manager.all_groups
    columns = {column.task for column in PAPER_COLUMNS}
    assert columns <= set(manager.all_subtasks)
    group = load_yaml_config(manager.task_index["paper"]["yaml_path"], mode="simple")
    assert set(group["task"]) == columns


def test_command_runs_the_package_tasks_after_the_callers(tmp_path):
    from slime_hf.evaluate import lmms_eval_command, parse_args
    from slime_hf.evaluation import TASKS_DIR

    args = parse_args(["--model", "m", "--include_path", str(tmp_path), "--num_processes", "2", "--limit", "5"])
    command = lmms_eval_command(args, tmp_path, cuda=False)
    assert command[1:5] == ["-m", "torch.distributed.run", "--nproc_per_node", "2"]
    folders = [command[i + 1] for i, part in enumerate(command) if part == "--include_path"]
    assert folders == [str(tmp_path), str(TASKS_DIR)]
    model_args = command[command.index("--model_args") + 1]
    assert model_args == f"pretrained=m,dtype=float32,budget_log={tmp_path / 'token_budget.jsonl'}"
    assert command[command.index("--limit") + 1] == "5"


def test_missing_lmms_eval_is_named(tmp_path, capsys, monkeypatch):
    import importlib.util

    from slime_hf.evaluate import main

    find_spec = importlib.util.find_spec

    def without_lmms_eval(name, *args):
        return None if name == "lmms_eval" else find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", without_lmms_eval)
    assert main(["--model", str(checkpoint("V")), "--output", str(tmp_path)]) == 2
    assert "lmms-eval is not installed" in capsys.readouterr().err
