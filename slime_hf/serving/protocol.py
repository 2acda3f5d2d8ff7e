"""Validation of OpenAI chat-completion requests into what the front end and the engine need.

Every problem is a `RequestError` naming the field, so the server answers HTTP 400 and keeps serving.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import RequestError
from .images import ImageLimits, load_image


SUPPORTED_FIELDS = {
    "model",
    "messages",
    "stream",
    "stream_options",
    "n",
    "temperature",
    "top_p",
    "max_tokens",
    "max_completion_tokens",
    "stop",
    "seed",
    "router_top_p",
    "return_token_ids",
    "user",
}


@dataclass
class ChatRequest:
    """A validated chat-completion request (images already loaded)."""

    conversation: list
    images: list
    stream: bool = False
    include_usage: bool = False
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    router_top_p: float | None = None
    return_token_ids: bool = False


def _number(body: dict, name: str, default, low: float, high: float, integer: bool = False):
    value = body.get(name, default)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise RequestError(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}", name)
    if not low <= value <= high:
        raise RequestError(f"{name} must be in [{low}, {high}], got {value!r}", name)
    return value


async def parse_chat_request(body: Any, image_token: str, limits: ImageLimits, max_images: int) -> ChatRequest:
    """Checks a decoded JSON body and loads its images.

    Args:
        body: the decoded request body.
        image_token (`str`): the processor's image placeholder (`<image>`); a text part may hold it to place an image
            itself, else each `image_url` part is placed where it stands.
        limits ([`ImageLimits`]): limits on each image.
        max_images (`int`): most images per request.
    """
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    unknown = sorted(set(body) - SUPPORTED_FIELDS)
    if unknown:
        raise RequestError(f"unsupported field(s): {', '.join(unknown)}", unknown[0])
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", "messages")
    conversation, images = [], []
    explicit_placeholders = False
    for m, message in enumerate(messages):
        where = f"messages[{m}]"
        if not isinstance(message, dict):
            raise RequestError(f"{where} must be an object", where)
        role = message.get("role")
        if role not in ("system", "user", "assistant"):
            raise RequestError(f"{where}.role must be system, user or assistant, got {role!r}", f"{where}.role")
        content = message.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise RequestError(f"{where}.content must be a string or a list of content parts", f"{where}.content")
        converted = []
        for p, part in enumerate(parts):
            part_where = f"{where}.content[{p}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise RequestError(f"{part_where}.text must be a string", f"{part_where}.text")
                explicit_placeholders |= image_token in text
                converted.append({"type": "text", "text": text})
            elif kind == "image_url":
                if role != "user":
                    raise RequestError(f"{part_where}: images are accepted in user messages only", part_where)
                image_url = part.get("image_url")
                url = image_url.get("url") if isinstance(image_url, dict) else image_url
                if len(images) >= max_images:
                    raise RequestError(f"{part_where}: more than {max_images} images in one request", part_where)
                images.append(await load_image(url, f"{part_where}.image_url", limits))
                converted.append({"type": "image"})
            else:
                raise RequestError(
                    f"{part_where}: unknown content type {kind!r} (supported: text, image_url)", f"{part_where}.type"
                )
        conversation.append({"role": role, "content": converted})
    if explicit_placeholders:
        # The text places the images itself: image parts add no placeholder of their own, and the counts must agree.
        for message in conversation:
            message["content"] = [part for part in message["content"] if part["type"] != "image"]
    if conversation[-1]["role"] == "assistant":
        raise RequestError("the last message must not be the assistant's (the server writes that one)", "messages")

    n = _number(body, "n", 1, 1, 16, integer=True)
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise RequestError("stream_options must be an object", "stream_options")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise RequestError("stop must be a non-empty string or a list of at most 4 of them", "stop")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    if max_tokens is not None:
        max_tokens = _number({name: max_tokens}, name, None, 1, 10**9, integer=True)
    router_top_p = body.get("router_top_p")
    if router_top_p is not None:
        router_top_p = _number(body, "router_top_p", None, 0.0, 1.0)
        if router_top_p == 0:
            raise RequestError("router_top_p must be in (0, 1], got 0", "router_top_p")
    temperature = float(_number(body, "temperature", 1.0, 0.0, 2.0))
    if temperature == 0 and n > 1:
        raise RequestError(f"n={n} needs sampling (temperature > 0): greedy answers would all be equal", "n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("stream must be true or false", "stream")
    return ChatRequest(
        conversation=conversation,
        images=images,
        stream=stream,
        include_usage=bool(stream_options.get("include_usage", False)),
        n=n,
        temperature=temperature,
        top_p=float(_number(body, "top_p", 1.0, 1e-9, 1.0)),
        max_tokens=max_tokens,
        stop=stop,
        seed=_number(body, "seed", None, -(2**63), 2**63 - 1, integer=True),
        router_top_p=router_top_p,
        return_token_ids=bool(body.get("return_token_ids", False)),
    )
