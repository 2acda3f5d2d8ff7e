"""The project's copy of the goldens is verbatim (checked when ../shared/fixtures/reference is beside the repo)."""

import filecmp

import pytest

from conftest import FIXTURES, SHARED_FIXTURES


@pytest.mark.skipif(not SHARED_FIXTURES.is_dir(), reason="no ../shared/fixtures/reference beside the repository")
def test_fixture_copy_is_identical_file_by_file():
    ours = sorted(p.relative_to(FIXTURES) for p in FIXTURES.rglob("*") if p.is_file())
    shared = sorted(p.relative_to(SHARED_FIXTURES) for p in SHARED_FIXTURES.rglob("*") if p.is_file())
    assert ours == shared
    for relative in ours:
        assert filecmp.cmp(FIXTURES / relative, SHARED_FIXTURES / relative, shallow=False), relative
