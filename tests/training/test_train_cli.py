"""`python -m slime_hf.train` without training: which checkpoint a resume picks, and bad input as one line."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest

from conftest import FIXTURES
from helpers import python_env, run_python
from slime_hf.train import _resume_target, cli
from slime_hf.training.trainer import CHECKPOINT_COMPLETE_NAME, last_complete_checkpoint
from training_helpers import IMAGE_FOLDER


def _checkpoint(output_dir, step: int, complete: bool):
    folder = output_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "slime_adapters.safetensors").write_bytes(b"")
    if complete:
        (folder / CHECKPOINT_COMPLETE_NAME).write_text(json.dumps({"global_step": step}))
    return folder


def _resume(output_dir, value="true"):
    return _resume_target(SimpleNamespace(resume_from_checkpoint=value, output_dir=str(output_dir)))


def test_resume_true_takes_the_newest_complete_checkpoint_and_says_what_it_skipped(tmp_path, caplog):
    """A kill during a save leaves a half-written checkpoint-N without the marker the save writes last: resuming
    passes over it (and says so) instead of failing with "Can't find a valid checkpoint"."""
    complete = _checkpoint(tmp_path, 2, complete=True)
    _checkpoint(tmp_path, 10, complete=True).rename(tmp_path / "checkpoint-10-old")  # not a checkpoint-N name
    _checkpoint(tmp_path, 4, complete=False)
    _checkpoint(tmp_path, 6, complete=False)
    with caplog.at_level(logging.WARNING, logger="slime_hf"):
        assert _resume(tmp_path) == str(complete)
    skipped = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(skipped) == 2 and "checkpoint-6" in skipped[0] and "checkpoint-4" in skipped[1]
    assert all("did not finish" in message for message in skipped)
    path, passed = last_complete_checkpoint(tmp_path)
    assert path == str(complete) and [p for p, _ in passed] == [str(tmp_path / f"checkpoint-{n}") for n in (6, 4)]


def test_resume_without_a_complete_checkpoint_is_a_clear_error(tmp_path):
    _checkpoint(tmp_path, 4, complete=False)
    with pytest.raises(ValueError, match="no complete checkpoint in .*pass a checkpoint's path"):
        _resume(tmp_path)
    with pytest.raises(ValueError, match="no such checkpoint folder"):
        _resume(tmp_path, str(tmp_path / "checkpoint-9"))
    assert _resume(tmp_path, str(tmp_path / "checkpoint-4")) == str(tmp_path / "checkpoint-4")  # explicit: as asked


def _cli_error(capsys, args: list[str]) -> str:
    capsys.readouterr()
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


COMMON = ["--max_steps", "1", "--report_to", "none", "--use_cpu", "true", "--image_folder", str(IMAGE_FOLDER)]


def test_bad_input_is_one_line_naming_the_problem(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "bad.json").write_text('[{"id": 1,,}]')
    (tmp_path / "ok.json").write_text("[]")
    checkpoint = str(FIXTURES / "V" / "checkpoint")
    out = ["--output_dir", str(tmp_path / "out")]

    message = _cli_error(
        capsys, ["--model_name_or_path", str(tmp_path / "nope"), "--data_path", "ok.json", *out, *COMMON]
    )
    assert "nope: no such folder" in message and "text model" not in message
    message = _cli_error(capsys, ["--model_name_or_path", checkpoint, "--data_path", "missing.json", *out, *COMMON])
    assert "training data file not found: missing.json" in message and "Hub" not in message
    message = _cli_error(capsys, ["--model_name_or_path", checkpoint, "--data_path", "bad.json", *out, *COMMON])
    assert "bad.json is not valid JSON" in message
    message = _cli_error(
        capsys,
        [
            "--model_name_or_path",
            checkpoint,
            "--data_path",
            "ok.json",
            *out,
            *COMMON,
            "--resume_from_checkpoint",
            "true",
        ],
    )
    assert "no complete checkpoint in" in message


def test_the_module_exits_with_status_2_and_no_traceback(tmp_path):
    arguments = ["--model_name_or_path", "./no_such_model", "--data_path", "data.json", "--output_dir", "out"]
    result = run_python("-m", "slime_hf.train", *arguments, cwd=tmp_path, timeout=300, check=False)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "error: training data file not found: data.json" in result.stderr


def test_a_hanging_process_group_teardown_is_left_behind_after_the_deadline(monkeypatch, caplog):
    """Once every process has passed the final barrier the run's work is saved: a teardown that never returns (a
    known torch.distributed hang) is reported after the deadline instead of holding the job."""
    import threading

    import torch.distributed as dist

    import slime_hf.train as train_module

    release = threading.Event()
    barriers = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "destroy_process_group", lambda: release.wait(30))
    monkeypatch.setattr(train_module, "TEARDOWN_DEADLINE_S", 0.2)
    trainer = SimpleNamespace(accelerator=SimpleNamespace(wait_for_everyone=lambda: barriers.append("barrier")))
    try:
        with caplog.at_level(logging.WARNING, logger="slime_hf"):
            train_module._leave_process_group(trainer)
    finally:
        release.set()
    assert barriers == ["barrier"]
    assert any("teardown did not finish within 0.2 s" in r.getMessage() for r in caplog.records)


def test_a_finished_multi_process_run_runs_its_exit_handlers_and_skips_the_interpreter_teardown(tmp_path):
    """`cli` in a process of a multi-process run: exit status 0, `atexit` handlers (trackers, loggers) run, the
    output is flushed, and the interpreter's finalization is skipped: a thread still running there (as gloo's can
    be) does not hold the process, while a single process ends the ordinary way and waits for it."""
    script = (
        "import atexit, sys, threading, time\n"
        "import slime_hf.train as train\n"
        "train.main = lambda argv=None: print('trained', end='')\n"
        f"atexit.register(lambda: open({str(tmp_path / 'atexit')!r}, 'w').write('ran'))\n"
        "def linger():\n"
        "    time.sleep(3)\n"
        f"    open({str(tmp_path / 'joined')!r}, 'w').write('ran')\n"
        "threading.Thread(target=linger).start()\n"
        "sys.exit(train.cli([]))\n"
    )
    result = run_python("-c", script, cwd=tmp_path, env=python_env(WORLD_SIZE="2"))
    assert (result.returncode, result.stdout) == (0, "trained")
    assert (tmp_path / "atexit").read_text() == "ran"
    assert not (tmp_path / "joined").exists()
    single = run_python("-c", script, cwd=tmp_path, env=python_env(WORLD_SIZE="1"))
    assert (single.returncode, single.stdout) == (0, "trained")
    assert (tmp_path / "joined").read_text() == "ran"
