"""transformers' own common test suite, for the installed transformers version, importable from our tests.

`ModelTesterMixin`, `ConfigTester` and `ProcessorTesterMixin` live in transformers' `tests/` directory, which the
wheel does not install. `load_common_tests()` downloads the source distribution of the INSTALLED version with pip
(`pip download --no-deps --no-binary :all: transformers==<version>`) into a cache outside the repository, extracts
it once, and imports its `tests/` directory as the package `transformers_common_tests` (not as `tests`, which
would clash with this project's own test directory). Nothing of it is copied into the repository.

Cache: `$SLIME_TRANSFORMERS_SRC_CACHE/<version>/` (default `~/.cache/slime-hf/transformers-src`, under
`$XDG_CACHE_HOME` when set). The download and extraction run under a file lock and end in an atomic rename, so
parallel test processes share one copy and an interrupted run never leaves a half-extracted tree.

The source distribution ships `tests/test_*.py` but not the sub-packages those modules import
(`tests/generation/`, `tests/exporters/`, `tests/utils/`) nor the repository's `utils/fetch_hub_objects_for_ci.py`.
Where a file is absent, a minimal stand-in is registered (see `_STAND_INS`); where a later source distribution
ships it, the real file is used.

A failed download raises: the tests then fail loudly (there is no way to skip them).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path

import transformers


PACKAGE = "transformers_common_tests"
CACHE_ENV = "SLIME_TRANSFORMERS_SRC_CACHE"


def cache_root() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "slime-hf" / "transformers-src"


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _safe_extract(archive: Path, destination: Path) -> None:
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 / 3.12
            tar.extractall(destination, filter="data")
        else:
            root = destination.resolve()
            for member in tar.getmembers():
                target = (destination / member.name).resolve()
                if root not in target.parents and target != root:
                    raise RuntimeError(f"unsafe path in {archive.name}: {member.name}")
            tar.extractall(destination)


def source_tree(version: str | None = None) -> Path:
    """The extracted source distribution of transformers `version` (default: the installed one), downloaded and
    extracted on first use. Raises `RuntimeError` with pip's output when the download fails."""
    version = version or transformers.__version__
    root = cache_root() / version
    tree = root / f"transformers-{version}"
    if (tree / "tests" / "__init__.py").is_file():
        return tree
    with _locked(cache_root() / f"{version}.lock"):
        if (tree / "tests" / "__init__.py").is_file():  # another process finished meanwhile
            return tree
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root, prefix=".download-") as work:
            work = Path(work)
            command = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--no-binary",
                ":all:",
                "--dest",
                str(work),
                f"transformers=={version}",
            ]
            result = subprocess.run(command, capture_output=True, text=True)
            archives = sorted(work.glob("transformers-*.tar.gz"))
            if result.returncode != 0 or not archives:
                raise RuntimeError(
                    f"could not download the source distribution of transformers=={version} "
                    f"(`{' '.join(command[2:])}` exited with {result.returncode}):\n{result.stdout}{result.stderr}\n"
                    "transformers' common tests need it (the package registry must be reachable)."
                )
            extracted = work / "extracted"
            _safe_extract(archives[0], extracted)
            unpacked = extracted / f"transformers-{version}"
            if not (unpacked / "tests" / "test_modeling_common.py").is_file():
                raise RuntimeError(f"{archives[0].name} holds no tests/test_modeling_common.py")
            # The repository's tests/ is a package; the source distribution drops its (empty) __init__.py, which
            # test_configuration_common.py opens (`direct_transformers_import(Path(__file__).parent)`).
            (unpacked / "tests" / "__init__.py").touch()
            if tree.exists():  # a tree without the __init__.py marker (not written by this function)
                shutil.rmtree(tree)
            os.replace(unpacked, tree)  # atomic: readers see no tree or the whole tree
    return tree


# Stand-ins for what the source distribution does not ship (module name relative to the package -> source).
_STAND_INS = {
    # `ModelTesterMixin` inherits it; the export tests run torch.export, which SliME's data-dependent routing
    # (a Python-level top-p cut per image) does not support anyway.
    "exporters.test_export": (
        'class ExportTesterMixin:\n    """Stand-in: tests/exporters/ is not in the source distribution."""\n'
    ),
    # Only imported for `issubclass(..., GenerationTesterMixin)` checks; SliME's test class does not run the
    # generation mixin (see tests/test_transformers_common.py).
    "generation.test_utils": (
        'class GenerationTesterMixin:\n    """Stand-in: tests/generation/ is not in the source distribution."""\n'
    ),
    # Read only by `ConfigTester.check_config_arguments_init`, which returns early for composite configs (configs
    # with `sub_configs`, as SliMEConfig).
    "utils.test_configuration_utils": (
        "config_common_kwargs = {}  # stand-in: tests/utils/ is not in the source distribution\n"
    ),
}
# Top-level module the processing / image-processing common tests import from the repository's `utils/`: in
# transformers' CI it maps Hub URLs to files downloaded beforehand. Here (no network in CI) an image URL maps to a small
# image generated once in the cache; other URLs (videos, audio: modalities SliME has not) stay URLs.
_FETCH_STAND_IN = """
import os
from pathlib import Path

IMAGE_DIR = Path({image_dir!r})


def url_to_local_path(url, return_url_if_not_found=True):
    name = str(url).rsplit("/", 1)[-1].split("?", 1)[0]
    if not name.lower().endswith((".png", ".jpg", ".jpeg")):
        return url
    path = IMAGE_DIR / name
    if not path.is_file():
        import numpy as np
        from PIL import Image

        IMAGE_DIR.mkdir(parents=True, exist_ok=True)
        rows, cols = np.mgrid[0:48, 0:64]
        pixels = np.stack([rows * 5, cols * 4, (rows + cols) * 2], axis=-1).astype(np.uint8)
        partial = IMAGE_DIR / (name + f".{{os.getpid()}}.tmp")
        Image.fromarray(pixels).save(partial, format="PNG")
        os.replace(partial, path)
    return str(path)
"""


def _module_from_source(name: str, source: str, filename: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__file__ = filename
    exec(compile(source, filename, "exec"), module.__dict__)
    return module


def _install_package(tests_dir: Path) -> None:
    if PACKAGE in sys.modules:
        return
    package = types.ModuleType(PACKAGE)
    package.__path__ = [str(tests_dir)]
    package.__file__ = str(tests_dir / "__init__.py")
    package.__package__ = PACKAGE
    sys.modules[PACKAGE] = package
    for relative, source in _STAND_INS.items():
        if (tests_dir / (relative.replace(".", "/") + ".py")).is_file():
            continue  # the source distribution ships it: the real module is imported on demand
        parts = relative.split(".")
        for depth in range(1, len(parts)):
            name = ".".join([PACKAGE, *parts[:depth]])
            if name not in sys.modules:
                sub = types.ModuleType(name)
                sub.__path__ = []
                sys.modules[name] = sub
                setattr(sys.modules[name.rpartition(".")[0]], parts[depth - 1], sub)
        name = f"{PACKAGE}.{relative}"
        module = _module_from_source(name, source, f"<stand-in {name}>")
        sys.modules[name] = module
        setattr(sys.modules[name.rpartition(".")[0]], parts[-1], module)
    fetch_file = tests_dir.parent / "utils" / "fetch_hub_objects_for_ci.py"
    if "fetch_hub_objects_for_ci" not in sys.modules and not fetch_file.is_file():
        source = _FETCH_STAND_IN.format(image_dir=str(tests_dir.parent.parent / "hub-image-stand-ins"))
        sys.modules["fetch_hub_objects_for_ci"] = _module_from_source(
            "fetch_hub_objects_for_ci", source, "<stand-in fetch_hub_objects_for_ci>"
        )


def load_common_tests() -> types.SimpleNamespace:
    """`test_modeling_common`, `test_configuration_common` and `test_processing_common` of the installed
    transformers, as modules."""
    tests_dir = source_tree() / "tests"
    _install_package(tests_dir)
    return types.SimpleNamespace(
        tree=tests_dir.parent,
        modeling=importlib.import_module(f"{PACKAGE}.test_modeling_common"),
        configuration=importlib.import_module(f"{PACKAGE}.test_configuration_common"),
        processing=importlib.import_module(f"{PACKAGE}.test_processing_common"),
    )
