"""SliME in lmms-eval: the model `slime_hf`, the package's task variants and `python -m slime_hf.evaluate`.

lmms-eval finds the model through the `lmms_eval.models` entry point (declared in the package's setup), which names
[`model_manifest`]; importing this package needs neither lmms-eval nor torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


__all__ = ["MODEL_NAME", "TASKS_DIR", "model_manifest"]

MODEL_NAME = "slime_hf"
"""The name lmms-eval knows the model by (`--model slime_hf`)."""

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
"""The package's task variants (the original's prompts), passed to lmms-eval as `--include_path`."""


def model_manifest() -> Any:
    """
    The lmms-eval model manifest of `slime_hf` (read by lmms-eval's model registry through the entry point).

    Returns:
        `lmms_eval.models.registry_v2.ModelManifest`: the model id and the class path of [`SliMELmms`].
    """
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path="slime_hf.evaluation.model.SliMELmms")
