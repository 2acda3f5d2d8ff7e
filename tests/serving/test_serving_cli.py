"""`python -m slime_hf.serve` rejects bad arguments and models with one line on stderr, before starting anything."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "/nonexistent/model"], "model folder not found: /nonexistent/model"),
        (["--model", "MODEL", "--tensor-parallel-size", "0"], "--tensor-parallel-size must be at least 1"),
        (["--model", "MODEL", "--shutdown-timeout", "-1"], "--shutdown-timeout must be non-negative"),
        (["--model", "MODEL", "--allowed-local-media-path", "/nonexistent"], "is not a folder: /nonexistent"),
    ],
)
def test_bad_arguments_are_one_line_without_traceback(tiny_model_dir, args, message):
    args = [str(tiny_model_dir) if arg == "MODEL" else arg for arg in args]
    result = subprocess.run(
        [sys.executable, "-m", "slime_hf.serve", *args], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, result.stderr
    assert "Traceback" not in result.stderr
