"""Workarounds for known defects of the installed lmms-eval, each gated on the versions that have it.

lmms-eval 0.7.3's evaluator passes every model output through `unwrap_generation_output`, which keeps strings and
`GenerationResult`s but turns any other value into its `str()`: the `(logprob, is_greedy)` pairs of `loglikelihood`
become text and every log-likelihood task fails in its `process_results`. A `GenerationResult` whose `text` is the
pair passes through unchanged, so on the affected versions the pairs travel wrapped.
"""

from __future__ import annotations

from importlib.metadata import version
from typing import Any

from packaging.version import Version


__all__ = ["LOGLIKELIHOOD_STRINGIFIED", "loglikelihood_needs_wrapping", "wrap_loglikelihood_results"]

LOGLIKELIHOOD_STRINGIFIED = (Version("0.7.3"), Version("0.7.3"))
"""First and last lmms-eval versions known to stringify `(logprob, is_greedy)` results (inclusive)."""


def loglikelihood_needs_wrapping(lmms_eval_version: str | None = None) -> bool:
    """
    Whether `loglikelihood` results must be wrapped for this lmms-eval version.

    Args:
        lmms_eval_version (`str`, *optional*): defaults to the installed lmms-eval's version.
    """
    installed = Version(lmms_eval_version or version("lmms_eval"))
    first, last = LOGLIKELIHOOD_STRINGIFIED
    return first <= installed <= last


def wrap_loglikelihood_results(results: list[tuple[float, bool]], lmms_eval_version: str | None = None) -> list[Any]:
    """
    `(logprob, is_greedy)` pairs in the form the installed lmms-eval's evaluator hands on to the tasks unchanged.

    Args:
        results (`list[tuple[float, bool]]`): one pair per request.
        lmms_eval_version (`str`, *optional*): defaults to the installed lmms-eval's version.

    Returns:
        `list`: the pairs themselves, or on the affected versions each wrapped in a `GenerationResult`.
    """
    if not loglikelihood_needs_wrapping(lmms_eval_version):
        return list(results)
    from lmms_eval.api.instance import GenerationResult

    return [GenerationResult(text=pair) for pair in results]
