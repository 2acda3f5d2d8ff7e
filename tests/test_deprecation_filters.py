"""pytest.ini and tests/deprecations.py: the package's own deprecated calls fail, third-party ones stay warnings."""

from __future__ import annotations

import sys
import types
import warnings

import pytest


LIBRARY = """
import warnings

def old():
    warnings.warn("old() is deprecated", FutureWarning)  # stacklevel=1: names the library's own line

def old_pointing_at_caller():
    warnings.warn("old_pointing_at_caller() is deprecated", DeprecationWarning, stacklevel=2)

def wrapper():
    old()
"""
OTHER_LIBRARY = "def call(lib):\n    lib.old()\n"
PACKAGE = """
def call(lib):
    lib.wrapper()

def call_pointing(lib):
    lib.old_pointing_at_caller()

def via_other(other, lib):
    other.call(lib)
"""


@pytest.fixture
def modules():
    created = {}
    for name, source in (
        ("fakelib_for_tests.core", LIBRARY),
        ("otherlib_for_tests.x", OTHER_LIBRARY),
        ("slime_hf._deprecation_probe", PACKAGE),
    ):
        module = types.ModuleType(name)
        exec(compile(source, f"<{name}>", "exec"), module.__dict__)  # noqa: S102 - fixed source above
        sys.modules[name] = created[name] = module
    yield types.SimpleNamespace(
        lib=created["fakelib_for_tests.core"],
        other=created["otherlib_for_tests.x"],
        own=created["slime_hf._deprecation_probe"],
    )
    for name in created:
        sys.modules.pop(name, None)


def test_own_call_into_a_library_warning_with_stacklevel_1_is_an_error(modules):
    with pytest.raises(FutureWarning, match="old"):
        modules.own.call(modules.lib)


def test_own_call_attributed_by_the_library_is_an_error(modules):
    with pytest.raises(DeprecationWarning, match="old_pointing_at_caller"):
        modules.own.call_pointing(modules.lib)


def test_a_deprecation_inside_third_party_code_stays_a_warning(modules):
    with pytest.warns(FutureWarning, match="old"):
        modules.own.via_other(modules.other, modules.lib)


def test_pytest_warns_still_records_the_packages_deprecations(modules):
    with pytest.warns(FutureWarning, match="old"):
        modules.own.call(modules.lib)


def test_other_warnings_are_untouched():
    with pytest.warns(UserWarning, match="hello"):
        warnings.warn("hello", stacklevel=1)
