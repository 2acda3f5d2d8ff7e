"""Serving SliME over vLLM: the front end runs here, the language model in vLLM's engine from `prompt_embeds`.

`python -m slime_hf.serve` runs the OpenAI-compatible server; [`export_language_model`] writes the plain decoder folder
vLLM loads. Importing this package needs no vLLM (only starting the engine does).
"""

from .export import export_language_model
from .tiny_model import build_tiny_serving_model


__all__ = ["export_language_model", "build_tiny_serving_model"]
