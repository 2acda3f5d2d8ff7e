"""The OpenAI-compatible HTTP application: `/v1/chat/completions` (with streaming), `/v1/models`, `/health`.

vLLM accepts `prompt_embeds` on completions only, so its chat server cannot be reused: this application renders the
chat template, runs SliME's front end ([`FrontEnd`]) and hands the assembled prompt to vLLM's async engine.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from .engine import generate, sampling_params
from .errors import RequestError, error_body
from .frontend import FrontEnd, PromptRequest
from .images import ImageLimits
from .protocol import ChatRequest, parse_chat_request


SHUT_DOWN = "the server shut down before the request finished"
DISCONNECT_POLL_S = 0.5  # how often a non-streamed request checks that its client is still there


@dataclass
class ServerState:
    """What the application serves with.

    Args:
        model_name (`str`): the name `/v1/models` lists and requests may give as `model`.
        processor ([`SliMEProcessor`]): renders chat templates.
        frontend ([`FrontEnd`]): assembles prompts.
        engine: vLLM's `AsyncLLM` (or `None` until the application starts it through `start_engine`).
        max_model_len (`int`): the engine's length limit.
        limits ([`ImageLimits`]): limits on request images.
        max_images (`int`): most images per request.
        api_key (`str`, *optional*): required as `Authorization: Bearer <key>` on `/v1/*` when set.
        chat_template (`str`, *optional*): the processor's template to use (its default otherwise).
        start_engine (callable, *optional*): starts the engine at application start-up (in the server's event loop).
    """

    model_name: str
    processor: Any
    frontend: FrontEnd
    engine: Any
    max_model_len: int
    limits: ImageLimits = field(default_factory=ImageLimits)
    max_images: int = 8
    api_key: str | None = None
    chat_template: str | None = None
    start_engine: Any = None
    created: int = field(default_factory=lambda: int(time.time()))
    active: dict = field(default_factory=dict)  # request id -> _Active
    draining: bool = False
    client_disconnects: int = 0  # requests given up because their client went away (reported by /health)


@dataclass
class _Active:
    request_id: str
    cancelled: bool = False
    cached_tokens: int = 0


def _error_response(error: RequestError):
    return JSONResponse(error.body(), status_code=error.status_code)


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def _usage(prepared, completion_tokens: int, cached_tokens: int) -> dict:
    details = {
        "cached_tokens": cached_tokens,  # prompt positions whose KV blocks came from vLLM's prefix cache
        "text_tokens": prepared.text_tokens,
        "image_tokens": prepared.image_tokens,
    }
    return {
        "prompt_tokens": prepared.length,
        "completion_tokens": completion_tokens,
        "total_tokens": prepared.length + completion_tokens,
        "prompt_tokens_details": details,
        "image_token_budget": [{key: int(value) for key, value in b.items()} for b in prepared.image_token_budget],
    }


def build_app(state: ServerState):
    """The FastAPI application over `state`."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        if state.engine is None and state.start_engine is not None:
            state.engine = state.start_engine()
        try:
            yield
        finally:
            await state.frontend.close()
            if state.engine is not None:
                state.engine.shutdown()

    app = FastAPI(title="SliME", lifespan=lifespan)
    app.state.slime = state

    def check_key(request: Request) -> None:
        if state.api_key is None:
            return
        if request.headers.get("authorization", "") != f"Bearer {state.api_key}":
            raise RequestError("invalid or missing API key", status_code=401, error_type="authentication_error")

    @app.exception_handler(RequestError)
    async def request_error(request: Request, error: RequestError):
        return _error_response(error)

    @app.get("/health")
    async def health():
        status = "draining" if state.draining else "ok"
        body = {
            "status": status,
            "running_requests": len(state.active),
            "client_disconnects": state.client_disconnects,
            "front_end": dict(state.frontend.stats),
        }
        processor = getattr(state.engine, "output_processor", None)
        if processor is not None:  # requests the engine still holds (a disconnected client's must be gone)
            body["engine_requests"] = processor.get_num_unfinished_requests()
        return JSONResponse(body, status_code=503 if state.draining else 200)

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        card = {
            "id": state.model_name,
            "object": "model",
            "created": state.created,
            "owned_by": "slime-hf",
            "max_model_len": state.max_model_len,
        }
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_key(request)
        if state.draining:
            raise RequestError("the server is shutting down", status_code=503, error_type="service_unavailable")
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise RequestError(f"the request body is not valid JSON: {error}") from None
        if isinstance(body, dict) and body.get("model") not in (None, state.model_name):
            raise RequestError(
                f"the model {body['model']!r} does not exist (this server serves {state.model_name!r})",
                "model",
                status_code=404,
            )
        # Registered from here on, so a shutdown waits for requests still in the front end too.
        active = _Active(f"chatcmpl-{uuid.uuid4().hex}")
        state.active[active.request_id] = active
        streaming = False
        try:
            chat = await parse_chat_request(body, state.processor.image_token, state.limits, state.max_images)
            try:
                text = state.processor.apply_chat_template(
                    chat.conversation, chat_template=state.chat_template, add_generation_prompt=True, tokenize=False
                )
            except Exception as error:  # the template's own checks (roles, order) raise several types
                raise RequestError(f"the messages do not fit the chat template: {error}", "messages") from None
            prepared = await state.frontend.prepare(PromptRequest(text, chat.images, chat.router_top_p))
            if active.cancelled:
                raise RequestError(SHUT_DOWN, status_code=503, error_type="service_unavailable")
            room = state.max_model_len - prepared.length
            max_tokens = chat.max_tokens if chat.max_tokens is not None else room
            if max_tokens > room:
                raise RequestError(
                    f"max_tokens={max_tokens} is more than the {room} tokens left after the prompt's "
                    f"{prepared.length} (the model's length limit is {state.max_model_len})",
                    "max_tokens",
                )
            try:
                params = sampling_params(chat.n, chat.temperature, chat.top_p, max_tokens, chat.stop, chat.seed)
            except ValueError as error:  # vLLM's own checks of the sampling parameters
                raise RequestError(f"invalid sampling parameters: {error}") from None
            if chat.stream:
                streaming = True  # the stream's generator unregisters the request
                return StreamingResponse(_stream(state, chat, prepared, params, active), media_type="text/event-stream")
            return await _complete(state, chat, prepared, params, active, request)
        finally:
            if not streaming:
                state.active.pop(active.request_id, None)

    return app


def _choice_extra(chat: ChatRequest, ids) -> dict:
    return {"token_ids": list(ids)} if chat.return_token_ids else {}


async def _final_output(state: ServerState, prepared, params, active: _Active) -> list | None:
    """The last output of each choice (with n > 1 an engine output may hold only the choices that advanced)."""
    latest: dict = {}
    async with aclosing(generate(state.engine, prepared.prompt_embeds, params, active.request_id)) as outputs:
        async for output in outputs:
            latest.update({choice.index: choice for choice in output.outputs})
            active.cached_tokens = output.num_cached_tokens or active.cached_tokens
    return [latest[index] for index in sorted(latest)] or None


async def _complete(state: ServerState, chat: ChatRequest, prepared, params, active: _Active, request: Request):
    # The answer is computed in a task watched for the client going away: cancelling it aborts the engine request.
    task = asyncio.ensure_future(_final_output(state, prepared, params, active))
    while not task.done():
        await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
        if not task.done() and await request.is_disconnected():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            state.client_disconnects += 1
            return JSONResponse(error_body("the client disconnected", "client_closed", None, 499), status_code=499)
    final = task.result()
    complete = final is not None and len(final) == chat.n and all(c.finish_reason for c in final)
    if active.cancelled or not complete:
        return JSONResponse(
            error_body(SHUT_DOWN, "service_unavailable", None, 503),
            status_code=503,
        )
    choices = [
        {
            "index": c.index,
            "message": {"role": "assistant", "content": c.text},
            "finish_reason": c.finish_reason,
            **_choice_extra(chat, c.token_ids),
        }
        for c in final
    ]
    completion = sum(len(c.token_ids) for c in final)
    return {
        "id": active.request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": state.model_name,
        "choices": choices,
        "usage": _usage(prepared, completion, active.cached_tokens),
    }


async def _stream(state: ServerState, chat: ChatRequest, prepared, params, active: _Active):
    """Server-sent events in the OpenAI chunk format; the engine request is aborted if the client goes away."""
    created = int(time.time())
    head = {"id": active.request_id, "object": "chat.completion.chunk", "created": created, "model": state.model_name}
    sent_text = [""] * chat.n
    sent_ids = [0] * chat.n
    done = [False] * chat.n
    try:
        for index in range(chat.n):
            delta = {"role": "assistant", "content": ""}
            yield _sse({**head, "choices": [{"index": index, "delta": delta, "finish_reason": None}]})
        async with aclosing(generate(state.engine, prepared.prompt_embeds, params, active.request_id)) as outputs:
            async for output in outputs:
                active.cached_tokens = output.num_cached_tokens or active.cached_tokens
                for c in output.outputs:
                    if done[c.index]:
                        continue
                    text, ids = c.text[len(sent_text[c.index]) :], list(c.token_ids[sent_ids[c.index] :])
                    finish = c.finish_reason if c.finish_reason in ("stop", "length") else None
                    if not text and not ids and finish is None:
                        continue
                    sent_text[c.index], sent_ids[c.index] = c.text, len(c.token_ids)
                    done[c.index] = finish is not None
                    choice = {"index": c.index, "delta": {"content": text}, "finish_reason": finish}
                    yield _sse({**head, "choices": [{**choice, **_choice_extra(chat, ids)}]})
        if active.cancelled or not all(done):
            yield _sse(error_body(SHUT_DOWN, "service_unavailable", None, 503))
        elif chat.include_usage:
            yield _sse({**head, "choices": [], "usage": _usage(prepared, sum(sent_ids), active.cached_tokens)})
        yield _sse("[DONE]")
    except (asyncio.CancelledError, GeneratorExit):  # the client went away: closing the engine stream aborted it
        state.client_disconnects += 1
        raise
    finally:
        state.active.pop(active.request_id, None)


async def drain_and_cancel(state: ServerState, timeout: float) -> None:
    """Lets running requests finish for `timeout` seconds, then aborts the rest (streams end with an error chunk,
    others answer 503) and waits briefly for those answers to go out."""
    state.draining = True
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while state.active and loop.time() < deadline:
        await asyncio.sleep(0.05)
    left = list(state.active.values())
    for active in left:
        active.cancelled = True
    if left and state.engine is not None:
        await state.engine.abort([active.request_id for active in left])
    deadline = loop.time() + 5.0
    while state.active and loop.time() < deadline:
        await asyncio.sleep(0.05)
