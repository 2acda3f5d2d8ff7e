"""A tiny random SliME that vLLM's CPU attention can run (head size 32), for the serving tests and benchmark.

Like the demo model (`slime_hf.demo`: its tokenizer, CLIP geometry of 336 px views, 576 global and 144 local queries)
but with two attention heads of 32 in the text model: vLLM's CPU attention supports head sizes 32, 64, 80, 96, 112,
128, ..., not the demo's 16. Real releases have head size 128.
"""

from __future__ import annotations

import os
from pathlib import Path


def build_tiny_serving_model(folder: str | os.PathLike, seed: int = 0, max_position_embeddings: int = 4096) -> Path:
    """Generates the tiny model deterministically from `seed` and saves model + processor to `folder`.

    Returns:
        `Path`: the folder (`SliMEForConditionalGeneration.from_pretrained` and `python -m slime_hf.serve --model`).
    """
    import torch

    from ..demo import demo_config, demo_processor
    from ..modeling_slime import SliMEForConditionalGeneration

    folder = Path(folder)
    processor = demo_processor()
    tokenizer = processor.tokenizer
    config = demo_config(
        processor,
        vocab_size=len(tokenizer),  # the image token's row included, as the serving tests' goldens were made
        num_attention_heads=2,  # head size 32
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
    )
    torch.manual_seed(seed)
    model = SliMEForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.model.global_adapter.gate_weight.normal_(0.0, 0.04)  # mix the two global experts unevenly
        # Random logits of a tiny model sit close together; a larger head spreads them so greedy answers are
        # well separated (fewer near-ties between the engine's and transformers' reduction orders).
        model.lm_head.weight.mul_(8.0)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.do_sample = False
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
