"""The README's snippets run against the demo model; `make demo`'s code path prints what it promises."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FIXTURES, PROJECT_ROOT


README = PROJECT_ROOT / "README.md"


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory) -> Path:
    from slime_hf.demo import build_demo_model

    return build_demo_model(tmp_path_factory.mktemp("demo") / "model")


def python_snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_snippets_run_against_the_demo_model(demo_folder, tmp_path, monkeypatch):
    from slime_hf.demo import DEMO_IMAGE

    snippets = python_snippets()
    assert len(snippets) >= 5
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photo.png").write_bytes(DEMO_IMAGE.read_bytes())
    namespace: dict = {}
    for snippet in snippets:
        code = snippet.replace("your-name/SliME-vicuna-7B-hf", str(demo_folder)).replace(
            "path/to/SliME-vicuna-7B", str(FIXTURES / "V" / "checkpoint")
        )
        exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README is ours
    assert (tmp_path / "SliME-vicuna-7B-hf" / "modeling_slime.py").is_file()


def test_readme_snippets_that_need_a_server_compile():
    """`py` blocks need a running server, several processes or a GPU: they are checked for syntax only."""
    snippets = re.findall(r"```py\n(.*?)```", README.read_text(), flags=re.S)
    assert snippets
    for snippet in snippets:
        compile(snippet, "README.md", "exec")


def test_demo_prints_grid_budget_stages_and_answer(demo_folder, monkeypatch):
    import io

    from slime_hf import demo

    monkeypatch.setenv("SLIME_DEMO_DIR", str(demo_folder))
    out = io.StringIO()
    answer = demo.run(demo.parse_args(["--max-new-tokens", "6"]), out=out)
    text = out.getvalue()
    assert "UNTRAINED DEMONSTRATION MODEL" in text
    assert "slicing: 1 global view + 2 x 3 grid = 6 local crops" in text
    assert re.search(r"token budget: global 576 \+ separator 1 \+ local kept \d+ of 864", text)
    for stage in ("processor", "vision tower", "adapters + router", "prefill", "decode"):
        assert stage in text
    assert answer and answer in text


@pytest.mark.parametrize(
    "args, message",
    [
        (["--image", "missing.png"], "image file not found: missing.png"),
        (["--dtype", "float8"], "invalid choice"),
        (["--prompt", "<image> and <image>?"], "2 <image> placeholder(s) but 1 image(s)"),
    ],
)
def test_demo_bad_input_is_one_line_without_traceback(demo_folder, args, message):
    env = dict(os.environ, SLIME_DEMO_DIR=str(demo_folder))
    result = subprocess.run(
        [sys.executable, "-m", "slime_hf.demo", *args, "--max-new-tokens", "2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert message in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith(("error", "usage"))]) >= 1


def _broken_copies(demo_folder: Path, root: Path) -> dict[str, Path]:
    import json
    import shutil

    folders = {}
    for name in ("broken", "llama"):
        folders[name] = root / name
        shutil.copytree(demo_folder, folders[name])
    (folders["broken"] / "config.json").write_text('{"model_type": "slime",')
    config = json.loads((demo_folder / "config.json").read_text())
    (folders["llama"] / "config.json").write_text(json.dumps(dict(config, model_type="llama")))
    return folders


def test_demo_rejects_bad_arguments_and_models_before_printing_anything(demo_folder, tmp_path, monkeypatch, capsys):
    """One `error:` line, status 2, nothing on stdout (no `answer:` before the refusal), for arguments checked up
    front, a device this torch lacks, a missing model folder, a broken config.json and another model type."""
    import torch

    from slime_hf import demo

    monkeypatch.setenv("SLIME_DEMO_DIR", str(demo_folder))
    folders = _broken_copies(demo_folder, tmp_path)
    cases = [
        (["--router-top-p", "2"], "--router-top-p must be in (0, 1], got 2.0"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1, got 0"),
        (["--device", "nodevice"], "unknown device 'nodevice'"),
        (["--model", str(tmp_path / "missing")], f"model folder not found: {tmp_path / 'missing'}"),
        (["--model", str(folders["broken"])], f"{folders['broken'] / 'config.json'} is not valid JSON"),
        (["--model", str(folders["llama"])], "model_type 'llama', not a SliME model"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "device 'cuda' requested but CUDA is not available"))
    for args, message in cases:
        capsys.readouterr()
        assert demo.main(args) == 2, args
        out, err = capsys.readouterr()
        assert out == "", (args, out)
        assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, (args, err)
