"""The front end alone (no engine): prompts prepared together equal each prepared alone, bit for bit, and equal the
model's own preparation; a bad request in a batch fails alone; the length is refused before any image is encoded."""

import asyncio

import pytest
import torch
from serving_helpers import CASES, case_images

from slime_hf.serving.errors import RequestError
from slime_hf.serving.frontend import FrontEnd, PromptRequest


def _request(reference, name: str) -> PromptRequest:
    text, images, router_top_p = CASES[name]
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    prompt = reference.processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    return PromptRequest(prompt, case_images(name), router_top_p)


def test_prepared_together_equals_prepared_alone_and_the_models_preparation(reference):
    front_end = FrontEnd(reference.model, reference.processor, 4096, max_batch_size=8, max_wait_ms=50)
    requests = [_request(reference, name) for name in CASES]

    async def run():
        together = await asyncio.gather(*(front_end.prepare(request) for request in requests))
        alone = [await front_end.prepare(request) for request in requests]
        return together, alone

    together, alone = asyncio.run(run())
    assert front_end.stats["largest_batch"] > 1
    for name, joint, single in zip(CASES, together, alone):
        assert torch.equal(joint.prompt_embeds, single.prompt_embeds), name
        inputs = reference.inputs(name)
        with torch.inference_mode():
            prepared = reference.model.model.prepare_multimodal_inputs(
                inputs["input_ids"],
                inputs["attention_mask"],
                inputs.get("pixel_values"),
                inputs.get("image_sizes"),
                router_top_p=inputs["router_top_p"],
            )
        assert torch.equal(single.prompt_embeds, prepared.inputs_embeds[0]), name
        assert single.image_token_budget == (prepared.image_token_budget or []), name


def test_a_bad_request_fails_alone(reference):
    front_end = FrontEnd(reference.model, reference.processor, 4096, max_batch_size=8, max_wait_ms=50)
    good = _request(reference, "one_image")
    bad = PromptRequest(good.text, good.images * 2, None)  # two images, one placeholder

    async def run():
        return await asyncio.gather(front_end.prepare(good), front_end.prepare(bad), return_exceptions=True)

    prepared, error = asyncio.run(run())
    assert isinstance(error, RequestError) and "1 image placeholders but 2 images" in error.message
    assert prepared.length == sum(b["total"] for b in prepared.image_token_budget) + prepared.text_tokens


def test_length_is_refused_before_any_image_is_encoded(reference, monkeypatch):
    front_end = FrontEnd(reference.model, reference.processor, 1000, max_batch_size=8, max_wait_ms=1)

    def never(*args, **kwargs):
        raise AssertionError("the vision path ran")

    monkeypatch.setattr(reference.model.model, "get_image_features", never)
    request = _request(reference, "two_images")  # at least 2 * 578 positions: over 1000
    with pytest.raises(RequestError, match="needs at least .* over the model's length limit of 1000"):
        asyncio.run(front_end.prepare(request))
