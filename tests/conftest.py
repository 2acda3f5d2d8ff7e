"""Shared test fixtures: every test reads the project's own copy of the goldens."""

import json
import os
from pathlib import Path

import pytest

from deprecations import attribute_to_callers


# Deprecations triggered by the package's own calls fail the tests even where the library warns with stacklevel=1
# (see tests/deprecations.py and the filters in pytest.ini).
attribute_to_callers()

PROJECT_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("SLIME_FIXTURES", PROJECT_ROOT / "tests" / "fixtures" / "reference"))
SHARED_FIXTURES = PROJECT_ROOT.parent / "shared" / "fixtures" / "reference"
VARIANTS = ("V", "L")


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def prompts() -> list:
    return json.loads((FIXTURES / "prompts.json").read_text())


def load_cases(variant: str) -> dict:
    return json.loads((FIXTURES / variant / "model_goldens" / "cases.json").read_text())
