"""SliME's front end for serving: processor, vision tower, adapters, router and assembly, batched across requests.

Requests are queued; a worker takes what arrived within `max_wait_ms` of the first (at most `max_batch_size`, one
`router_top_p` per batch) and runs [`~SliMEModel.prepare_multimodal_inputs`] once for them in a worker thread, so the
event loop (and vLLM's output handling) keeps running. Each request gets its assembled prompt: the embeddings vLLM
takes as `prompt_embeds` and the per-image token budget.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from .errors import RequestError


@dataclass
class PromptRequest:
    """One request's prompt, before assembly.

    Args:
        text (`str`): the rendered chat prompt, one `<image>` per image.
        images (`list`): PIL images in placeholder order.
        router_top_p (`float`, *optional*): the router's top-p for this request.
    """

    text: str
    images: list = field(default_factory=list)
    router_top_p: float | None = None


@dataclass
class PreparedPrompt:
    """One request's assembled prompt.

    Args:
        prompt_embeds (`torch.Tensor` of shape `(length, hidden)`): what vLLM takes as `prompt_embeds`.
        image_token_budget (`list[dict]`): per image, `global`, `separator`, `local_kept`, `local_total`, `total`.
        text_tokens (`int`): tokens of the prompt's text (without images).
    """

    prompt_embeds: torch.Tensor
    image_token_budget: list
    text_tokens: int

    @property
    def length(self) -> int:
        return int(self.prompt_embeds.shape[0])

    @property
    def image_tokens(self) -> int:
        return sum(int(budget["total"]) for budget in self.image_token_budget)


@dataclass
class _Item:
    request: PromptRequest
    future: asyncio.Future
    inputs: dict | None = None


class FrontEnd:
    """Turns chat prompts into assembled `prompt_embeds`, batching the image work of concurrent requests.

    Args:
        model ([`SliMEForConditionalGeneration`] or [`SliMEModel`]): the model; only its vision path, token embedding
            and assembly run here.
        processor ([`SliMEProcessor`]): the model's processor.
        max_model_len (`int`): the engine's length limit; a prompt must leave room for one new token.
        max_batch_size (`int`, *optional*, defaults to 8): most requests prepared together.
        max_wait_ms (`float`, *optional*, defaults to 5.0): how long the first queued request waits for others.
    """

    def __init__(self, model, processor, max_model_len: int, max_batch_size: int = 8, max_wait_ms: float = 5.0):
        self.slime = getattr(model, "model", model)
        self.processor = processor
        self.max_model_len = max_model_len
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.pad_id = processor.tokenizer.pad_token_id
        self.image_token_id = self.slime.config.image_token_id
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slime-front-end")
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        # assembly calls so far, prompts they prepared and the most in one call (reported by /health)
        self.stats = {"batches": 0, "prompts": 0, "largest_batch": 0}

    # -- the public coroutine ---------------------------------------------------------------------------------
    async def prepare(self, request: PromptRequest) -> PreparedPrompt:
        """Queues one request and returns its assembled prompt (raises `RequestError` for bad input)."""
        loop = asyncio.get_running_loop()
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._worker = loop.create_task(self._run())
        item = _Item(request, loop.create_future())
        await self._queue.put(item)
        return await item.future

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- batching -----------------------------------------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.max_wait
            while len(batch) < self.max_batch_size:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            batch = [item for item in batch if not item.future.done()]  # a cancelled request needs no work
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(self._executor, self._prepare_batch, batch)
            except Exception as error:  # never leave a request waiting
                results = [error] * len(batch)
            for item, result in zip(batch, results):
                if item.future.done():
                    continue
                if isinstance(result, BaseException):
                    item.future.set_exception(result)
                else:
                    item.future.set_result(result)

    def _prepare_batch(self, batch: list[_Item]) -> list:
        """In the worker thread: tokenize and check every request, then assemble those that passed, one call per
        `router_top_p` (each request alone if a joint call fails, so one bad request fails only itself)."""
        results: list = [None] * len(batch)
        groups: dict = {}
        for index, item in enumerate(batch):
            try:
                item.inputs = self._tokenize(item.request)
                groups.setdefault(item.request.router_top_p, []).append(index)
            except RequestError as error:
                results[index] = error
            except ValueError as error:
                results[index] = RequestError(str(error), "messages")
        with torch.inference_mode():
            for router_top_p, indices in groups.items():
                try:
                    prepared = self._assemble([batch[i] for i in indices], router_top_p)
                except (ValueError, RequestError):
                    prepared = None
                if prepared is not None:
                    self._record(len(indices))
                    for i, result in zip(indices, prepared):
                        results[i] = result
                    continue
                for i in indices:  # find which request failed
                    try:
                        results[i] = self._assemble([batch[i]], router_top_p)[0]
                        self._record(1)
                    except RequestError as error:
                        results[i] = error
                    except ValueError as error:
                        results[i] = RequestError(str(error), "messages")
        return results

    def _record(self, prompts: int) -> None:
        self.stats["batches"] += 1
        self.stats["prompts"] += prompts
        self.stats["largest_batch"] = max(self.stats["largest_batch"], prompts)

    def _tokenize(self, request: PromptRequest) -> dict:
        placeholders = request.text.count(self.processor.image_token)
        if placeholders != len(request.images):
            raise RequestError(
                f"the messages hold {placeholders} image placeholders but {len(request.images)} images were given",
                "messages",
            )
        if request.images:
            inputs = self.processor(text=request.text, images=request.images, return_tensors="pt")
        else:
            inputs = self.processor(text=request.text, return_tensors="pt")
        ids = inputs["input_ids"][0]
        self._check_length_before_encoding(ids)
        return inputs

    def _check_length_before_encoding(self, ids: torch.Tensor) -> None:
        """The shortest the assembled prompt can be (each image keeping one local token) must leave room for one new
        token: checked before any image is encoded."""
        config = self.slime.config
        vision = config.vision_config
        block = 0
        if not config.use_local_only:
            block += (vision.image_size // vision.patch_size) ** 2
        if not config.use_local_only and not config.use_global_only:
            block += 1
        if not config.use_global_only:
            block += 1
        images = int((ids == self.image_token_id).sum())
        shortest = int(ids.numel()) - images + images * block
        if shortest + 1 > self.max_model_len:
            raise RequestError(
                f"the prompt needs at least {shortest} tokens ({int(ids.numel()) - images} text tokens and {images} "
                f"image blocks of at least {block}), over the model's length limit of {self.max_model_len} "
                "(with one token to generate)",
                "messages",
            )

    def _assemble(self, items: list[_Item], router_top_p: float | None) -> list[PreparedPrompt]:
        rows = [item.inputs["input_ids"][0] for item in items]
        width = max(int(row.numel()) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for index, row in enumerate(rows):  # left padding, as for generation
            input_ids[index, width - row.numel() :] = row
            attention_mask[index, width - row.numel() :] = 1
        pixels = [item.inputs["pixel_values"] for item in items if "pixel_values" in item.inputs]
        pixel_values = image_sizes = None
        if pixels:
            views = max(int(p.shape[1]) for p in pixels)
            pixel_values = torch.cat(
                [torch.nn.functional.pad(p, (0, 0, 0, 0, 0, 0, 0, views - p.shape[1])) for p in pixels]
            )
            image_sizes = torch.cat([item.inputs["image_sizes"] for item in items if "image_sizes" in item.inputs])
            dtype = self.slime.adapter_dtype
            pixel_values = pixel_values.to(device=self.slime.device, dtype=dtype)
        prepared = self.slime.prepare_multimodal_inputs(
            input_ids.to(self.slime.device),
            attention_mask.to(self.slime.device),
            pixel_values,
            image_sizes,
            router_top_p=router_top_p,
            padding_side="left",
        )
        budgets = list(prepared.image_token_budget or [])
        results = []
        for index, (item, row) in enumerate(zip(items, rows)):
            real = prepared.attention_mask[index].bool()
            embeds = prepared.inputs_embeds[index][real].detach().to("cpu").contiguous()
            images = len(item.request.images)
            budget, budgets = budgets[:images], budgets[images:]
            result = PreparedPrompt(embeds, budget, int(row.numel()) - images)
            if result.length + 1 > self.max_model_len:
                raise RequestError(
                    f"the prompt is {result.length} tokens after routing ({result.text_tokens} text and "
                    f"{result.image_tokens} image tokens), over the model's length limit of {self.max_model_len} "
                    "(with one token to generate)",
                    "messages",
                )
            results.append(result)
        return results
