"""`python -m slime_hf.evaluate --model REPO_OR_DIR --tasks paper [--limit N] [--output DIR]`

Runs lmms-eval with the model `slime_hf` on the package's task variants (the original's evaluation protocol; the group
`paper` is the ten columns of the paper's main table) or on any lmms-eval tasks, then prints and writes (Markdown and
JSON) the results next to the paper's numbers for the matching release, with the difference and the mean number of
local image tokens the router kept per benchmark. Needs the `[eval]` environment (see README "Evaluation").
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .command_line import run_reporting_errors
from .evaluation import MODEL_NAME, TASKS_DIR
from .evaluation.paper import PAPER_RESULTS, release_from_config
from .evaluation.report import budget_summary, comparison_rows, find_results_file, to_markdown


DTYPES = ("float32", "bfloat16", "float16")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m slime_hf.evaluate", description=__doc__.split("\n\n")[1])
    parser.add_argument("--model", required=True, help="a converted SliME folder or Hub repo (or an authors' folder)")
    parser.add_argument("--tasks", default="paper", help="comma-separated lmms-eval tasks or groups (default: paper)")
    parser.add_argument("--limit", type=float, default=None, help="samples per task (testing only: not the paper's)")
    parser.add_argument("--output", default=None, help="output folder (default: eval_results/<model>-<time>)")
    parser.add_argument(
        "--release",
        default=None,
        help=f"paper row to compare with: {', '.join(PAPER_RESULTS)} or none (default: from the model's size)",
    )
    parser.add_argument("--batch_size", type=int, default=1, help="prompts per generate call and process")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: float16 on CUDA (the original's)")
    parser.add_argument("--router_top_p", type=float, default=None, help="the router's top-p (default: the model's)")
    parser.add_argument("--num_processes", type=int, default=1, help="data-parallel processes (torchrun)")
    parser.add_argument(
        "--include_path", action="append", default=[], help="more task folders, ahead of the package's (repeatable)"
    )
    parser.add_argument("--gen_kwargs", default=None, help="generation settings for every task (lmms-eval's syntax)")
    return parser.parse_args(argv)


def _config_dict(model: str) -> dict:
    if os.path.isdir(model):
        path = Path(model) / "config.json"
        if not path.is_file():
            raise ValueError(f"--model {model}: the folder has no config.json")
    else:
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(model, "config.json"))
    config = json.loads(path.read_text(encoding="utf-8"))
    # the authors' llava_llama layout keeps the language model's fields at the top level
    return config if "text_config" in config else {"text_config": config}


def resolve_release(model: str, release: str | None) -> str | None:
    """The paper row to compare with: `--release` (`none` for no comparison), else the one of the model's size."""
    if release is not None:
        if release.lower() == "none":
            return None
        if release not in PAPER_RESULTS:
            raise ValueError(f"--release {release!r}: choose one of {', '.join(PAPER_RESULTS)} or none")
        return release
    return release_from_config(_config_dict(model))


def lmms_eval_command(args: argparse.Namespace, output: Path, cuda: bool) -> list[str]:
    """The command that runs lmms-eval (under `accelerate launch` for several processes)."""
    model_args = [f"pretrained={args.model}", f"dtype={args.dtype or ('float16' if cuda else 'float32')}"]
    model_args.append(f"budget_log={output / 'token_budget.jsonl'}")
    if args.router_top_p is not None:
        model_args.append(f"router_top_p={args.router_top_p}")
    launcher = [sys.executable, "-m", "slime_hf.evaluation.launch"]
    if args.num_processes > 1:
        # torchrun: one process per GPU, or several on the CPU (where accelerate launch starts only one without MPI)
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.num_processes)]
        launcher += ["-m", "slime_hf.evaluation.launch"]
    command = [*launcher, "--model", MODEL_NAME, "--model_args", ",".join(model_args), "--tasks", args.tasks]
    # lmms-eval keeps the first definition of a task name: the caller's folders come first, so they can replace a
    # package task (e.g. the same benchmark on local data)
    for folder in [*args.include_path, str(TASKS_DIR)]:
        command += ["--include_path", folder]
    command += ["--batch_size", str(args.batch_size), "--output_path", str(output / "lmms_eval"), "--log_samples"]
    if args.limit is not None:
        command += ["--limit", str(int(args.limit) if float(args.limit).is_integer() else args.limit)]
    if args.gen_kwargs:
        command += ["--gen_kwargs", args.gen_kwargs]
    return command


def evaluate(args: argparse.Namespace) -> None:
    if args.limit is not None and args.limit <= 0:
        raise ValueError(f"--limit must be positive, got {args.limit}")
    if args.batch_size < 1 or args.num_processes < 1:
        raise ValueError("--batch_size and --num_processes must be at least 1")
    if args.router_top_p is not None and not 0 < args.router_top_p <= 1:
        raise ValueError(f"--router_top_p must be in (0, 1], got {args.router_top_p}")
    for folder in args.include_path:
        if not os.path.isdir(folder):
            raise ValueError(f"--include_path {folder}: not a folder")
    if not os.path.isdir(args.model) and (args.model.startswith((".", "/", "~")) or os.path.exists(args.model)):
        raise ValueError(f"--model {args.model}: no such folder")
    if importlib.util.find_spec("lmms_eval") is None:
        raise ValueError("lmms-eval is not installed: see the README's Evaluation section (the [eval] install)")
    release = resolve_release(args.model, args.release)
    import torch

    name = Path(args.model.rstrip("/")).name
    output = Path(args.output or Path("eval_results") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    output.mkdir(parents=True, exist_ok=True)
    command = lmms_eval_command(args, output, torch.cuda.is_available())
    status = subprocess.run(command).returncode
    if status != 0:
        raise SystemExit(f"lmms-eval failed (exit status {status}); its output is above")
    results_file = find_results_file(output / "lmms_eval")
    results = json.loads(results_file.read_text(encoding="utf-8"))
    budgets = budget_summary(sorted(output.glob("token_budget.jsonl*")))
    rows = comparison_rows(results["results"], budgets, release)
    markdown = to_markdown(rows, release, args.model)
    if args.limit is not None:
        limit = int(args.limit) if float(args.limit).is_integer() else args.limit
        markdown += f"\n--limit {limit}: a subset of each benchmark, not comparable with the paper.\n"
    (output / "results.md").write_text(markdown, encoding="utf-8")
    report = {
        "model": args.model,
        "release": release,
        "tasks": args.tasks,
        "limit": args.limit,
        "rows": rows,
        "token_budget": budgets,
        "lmms_eval_results": str(results_file),
    }
    (output / "results.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(markdown)
    print(f"written: {output / 'results.md'} and {output / 'results.json'}")


def main(argv: list[str] | None = None) -> int:
    return run_reporting_errors(evaluate, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
