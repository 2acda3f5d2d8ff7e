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
    from transformers import AutoTokenizer

    from ..configuration_slime import SliMEConfig
    from ..demo import DEMO_TOKENIZER
    from ..image_processing_slime import SliMEImageProcessorPil
    from ..modeling_slime import SliMEForConditionalGeneration
    from ..processing_slime import SliMEProcessor

    folder = Path(folder)
    tokenizer = AutoTokenizer.from_pretrained(str(DEMO_TOKENIZER))
    processor = SliMEProcessor(image_processor=SliMEImageProcessorPil(), tokenizer=tokenizer)
    config = SliMEConfig(
        text_config={
            "model_type": "llama",
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,  # head size 32
            "num_key_value_heads": 2,
            "max_position_embeddings": max_position_embeddings,
            "rms_norm_eps": 1e-5,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 336,
            "patch_size": 14,
            "hidden_act": "quick_gelu",
        },
        image_token_id=processor.image_token_id,
        separator_token_id=tokenizer(",", add_special_tokens=False).input_ids[-1],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
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
