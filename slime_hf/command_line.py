"""How the package's command-line entry points end: bad input is one line on stderr, never a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from transformers.utils import logging


logger = logging.get_logger(__name__)


def run_reporting_errors(function: Callable[..., Any], *args: Any) -> int:
    """Runs `function(*args)`; returns the exit status: 0, or 2 after one `error: ...` line on stderr for bad input
    (`ValueError`, `OSError`; the traceback is logged at debug level), or 130 when interrupted."""
    try:
        function(*args)
    except (ValueError, OSError) as error:
        logger.debug("traceback of the error below", exc_info=True)
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
