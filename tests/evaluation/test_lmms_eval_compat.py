"""The version-gated lmms-eval workaround: on the versions whose evaluator stringifies `(logprob, is_greedy)` pairs,
`loglikelihood` hands them over wrapped, and they reach the tasks unchanged; the gate matches the installed lmms-eval's
actual behaviour (this fails, asking for the gate to move, when an lmms-eval release fixes or keeps the defect)."""

from importlib.metadata import entry_points, version

from lmms_eval.api.instance import GenerationResult, unwrap_generation_output
from lmms_eval.models import get_model

from slime_hf.evaluation import model_manifest
from slime_hf.evaluation.compat import loglikelihood_needs_wrapping, wrap_loglikelihood_results
from slime_hf.evaluation.model import SliMELmms


PAIRS = [(-1.25, True), (-7.5, False)]


def test_gate_matches_the_installed_evaluator():
    stringified = unwrap_generation_output(PAIRS[0])[0] != PAIRS[0]
    assert loglikelihood_needs_wrapping() == stringified, version("lmms_eval")


def test_wrapped_pairs_reach_the_tasks_unchanged():
    wrapped = wrap_loglikelihood_results(PAIRS)
    assert [unwrap_generation_output(item)[0] for item in wrapped] == PAIRS


def test_gate_by_version():
    assert loglikelihood_needs_wrapping("0.7.3")
    assert not loglikelihood_needs_wrapping("0.7.2")
    assert not loglikelihood_needs_wrapping("0.7.4")
    assert wrap_loglikelihood_results(PAIRS, "0.7.4") == PAIRS
    assert all(isinstance(item, GenerationResult) for item in wrap_loglikelihood_results(PAIRS, "0.7.3"))


def test_lmms_eval_finds_the_model_through_the_entry_point():
    (entry,) = [e for e in entry_points(group="lmms_eval.models") if e.name == "slime_hf"]
    assert entry.load() is model_manifest
    assert get_model("slime_hf") is SliMELmms
