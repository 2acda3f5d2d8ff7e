"""Deprecations triggered by the package's own calls fail the tests, whatever `stacklevel` the library warns with.

`pytest.ini` turns DeprecationWarning, PendingDeprecationWarning and FutureWarning attributed to a `slime_hf` module
(or to the remote-code copies under `transformers_modules`) into errors. Python attributes a warning to the frame
`stacklevel` names, and libraries often warn with the default `stacklevel=1` (transformers' `is_gradient_checkpointing`
and `TrainingArguments` aliases, for instance): the warning then names the library's own line, and a deprecated call
made by the package would pass as a third-party warning. `attribute_to_callers()` wraps `warnings.warn` so that a
deprecation raised by a library is attributed to the first frame outside that library (import machinery skipped):
when that frame is the package's, the pytest.ini filters make it an error (and `pytest.warns` still records it);
when it is another library's (peft calling transformers, say), it stays a visible warning. Warnings raised from C
and by code that bound `from warnings import warn` before the tests start are left as they are.
"""

from __future__ import annotations

import sys
import warnings


OWN_PREFIXES = ("slime_hf", "transformers_modules")
DEPRECATIONS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
TRANSPARENT = ("importlib", "<frozen")  # import machinery between an importing module and a module-level warning


def _top(frame) -> str:
    return (frame.f_globals.get("__name__") or "").split(".")[0]


def _caller_level(frame) -> int | None:
    """How many frames above `frame` (the function that warns) the library was called from by the package."""
    library, level = _top(frame), 0
    if library.startswith(OWN_PREFIXES):
        return None
    while frame is not None and (_top(frame) == library or _top(frame).startswith(TRANSPARENT)):
        frame, level = frame.f_back, level + 1
    if frame is None or not _top(frame).startswith(OWN_PREFIXES):
        return None
    return level


def attribute_to_callers() -> None:
    """Wraps `warnings.warn` once per process (see the module docstring)."""
    original = warnings.warn
    if getattr(original, "_slime_attributes_to_callers", False):
        return

    def warn(message, category=None, stacklevel=1, source=None, **kwargs):
        kind = type(message) if isinstance(message, Warning) else (category or UserWarning)
        if isinstance(kind, type) and issubclass(kind, DEPRECATIONS):
            level = _caller_level(sys._getframe(1))
            if level is not None:
                return original(message, category, 2 + level, source, **kwargs)
        return original(message, category, stacklevel + 1, source, **kwargs)

    warn._slime_attributes_to_callers = True
    warnings.warn = warn
