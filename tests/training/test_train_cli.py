"""`python -m slime_hf.train` without training: which checkpoint a resume picks, and bad input as one line."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest

from conftest import FIXTURES
from helpers import run_python
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
