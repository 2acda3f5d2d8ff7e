"""Shared pieces of the tests: subprocess runs (with the package importable or hidden) and model folders built from the
fixture checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import FIXTURES, PROJECT_ROOT
from slime_hf import SliMEForConditionalGeneration, SliMEProcessor


CONVERSION_PACKAGE = PROJECT_ROOT / "slime_hf" / "conversion"
# A script preamble that makes `slime_hf` unimportable, the way the converter's verification does it
# (`slime_hf/conversion/remote_check.py`, which imports nothing from the package).
HIDE_PACKAGE = (
    "import sys\n"
    f"sys.path.insert(0, {str(CONVERSION_PACKAGE)!r})\n"
    "from remote_check import hide_package\n"
    "hide_package()\n"
    "sys.path.pop(0)\n"
)
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def python_env(with_package: bool = True, modules_cache: Path | None = None, **variables: str) -> dict[str, str]:
    """
    The environment of a test's Python subprocess: offline, and the checkout's package importable
    (`with_package=True`: on `PYTHONPATH`) or left to the script to hide (`PYTHONPATH` removed).

    Args:
        with_package (`bool`): whether to put the checkout on `PYTHONPATH`.
        modules_cache (`Path`, *optional*): where `trust_remote_code=True` copies a folder's code files.
        variables: more environment variables.
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if with_package:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))
    env["HF_HUB_OFFLINE"] = "1"
    if modules_cache is not None:
        env["HF_MODULES_CACHE"] = str(modules_cache)
    env.update(variables)
    return env


def run_python(
    *args: str,
    cwd: Path,
    env: dict[str, str] | None = None,
    timeout: int = 600,
    stdin: str | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """
    Runs `python *args` (the interpreter running the tests) and returns the finished process; with `check`, a non-zero
    exit fails the test with the end of its stderr. A run still going after `timeout` seconds fails the test with the
    Python stacks of all its processes (launchers such as `torchrun` included), so a hang says where it hangs.
    """
    env = dict(python_env() if env is None else env, PYTHONFAULTHANDLER="1")
    command = [sys.executable, *args]
    with subprocess.Popen(
        command,
        cwd=cwd,
        env=env,
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        try:
            stdout, stderr = process.communicate(stdin, timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            stdout, stderr = _stop_with_stacks(process)
            timed_out = True
    if timed_out:
        pytest.fail(
            f"timed out after {timeout} s: {' '.join(command)}\n--- stdout (end)\n{stdout[-2000:]}\n"
            f"--- stderr (end, with every process's stacks)\n{stderr[-12000:]}",
            pytrace=False,
        )
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    if check:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def _stop_with_stacks(process: subprocess.Popen) -> tuple[str, str]:
    """SIGABRT to the run and every process below it (faulthandler prints each one's Python stacks; launchers such as
    `torchrun` start their workers in sessions of their own), then SIGKILL; returns the output collected."""
    import psutil

    try:
        tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for sig, grace in ((signal.SIGABRT, 10), (signal.SIGKILL, 30)):
        for member in reversed(tree):  # workers first: their stacks are the interesting ones
            try:
                member.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        try:
            return process.communicate(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
    return "", ""


def run_hidden(script: str, *args: str, cwd: Path) -> dict:
    """Runs a script (prefixed with `HIDE_PACKAGE`) in a fresh Python where `slime_hf` cannot be imported; returns the
    last line of its output, parsed as JSON."""
    env = python_env(with_package=False, modules_cache=cwd / "hf_modules", TRANSFORMERS_VERBOSITY="error")
    result = run_python("-c", HIDE_PACKAGE + script, *args, cwd=cwd, env=env)
    return json.loads(result.stdout.strip().splitlines()[-1])


def save_checkpoint(variant: str, folder: Path, processor: bool = True) -> Path:
    """A fixture checkpoint (the authors' layout) saved as a self-contained folder: package weights, the remote code
    and, with `processor`, the processor files."""
    checkpoint = FIXTURES / variant / "checkpoint"
    SliMEForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).save_pretrained(folder)
    if processor:
        SliMEProcessor.from_pretrained(checkpoint).save_pretrained(folder)
    return folder


def make_base_llm(variant: str, folder: Path, generation_config: bool = False) -> Path:
    """
    The language model of a fixture checkpoint as a plain Llama folder with its tokenizer (a 'base LLM'); with
    `generation_config`, the checkpoint's `generation_config.json` replaces the one the Llama model writes.
    """
    from transformers import LlamaForCausalLM

    checkpoint = FIXTURES / variant / "checkpoint"
    slime = SliMEForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32)
    llm = LlamaForCausalLM(slime.config.text_config)
    llm.model.load_state_dict(slime.model.language_model.state_dict())
    llm.lm_head.load_state_dict(slime.lm_head.state_dict())
    llm.save_pretrained(folder)
    names = TOKENIZER_FILES + (("generation_config.json",) if generation_config else ())
    for name in names:
        if (checkpoint / name).is_file():
            shutil.copy(checkpoint / name, folder / name)
    return folder
