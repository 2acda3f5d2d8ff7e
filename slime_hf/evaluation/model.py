"""lmms-eval model `slime_hf`: a SliME release (converted or in the authors' layout) evaluated through lmms-eval.

Prompts are the original evaluation's ([`~slime_hf.evaluation.prompting.render_prompt`]); answers come from
[`SliMEForConditionalGeneration.generate`] in left-padded batches; every sample's image-token budget is recorded.
Run with `python -m lmms_eval --model slime_hf --model_args pretrained=FOLDER,...` (or `accelerate launch
--num_processes N -m lmms_eval ...` for data parallelism), or through `python -m slime_hf.evaluate`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from accelerate import Accelerator
from lmms_eval import utils as lmms_utils
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from PIL import Image
from tqdm import tqdm

from ..modeling_slime import SliMEForConditionalGeneration
from ..processing_slime import SliMEProcessor
from .compat import wrap_loglikelihood_results
from .prompting import render_prompt


__all__ = ["SliMELmms", "DTYPES"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MAX_NEW_TOKENS = 128  # used only when a task sets no max_new_tokens
_GREEDY_IGNORED = ("temperature", "top_p", "top_k")


def _as_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ValueError(f"slime_hf: {name} must be true or false, got {value!r}")


class SliMELmms(lmms):
    """
    A SliME model in lmms-eval (`--model slime_hf`).

    Args:
        pretrained (`str`):
            A converted SliME folder or Hub repo, or a checkpoint folder in the authors' layout.
        dtype (`str`, *optional*, defaults to `"float32"`):
            `float32`, `bfloat16` or `float16`.
        device (`str`, *optional*):
            Where the model runs with one process (default: `cuda` when available, else `cpu`). With several
            processes (`accelerate launch`) each process uses its own device.
        device_map (`str`, *optional*):
            Passed to `from_pretrained` (e.g. `auto` to spread a large release over the visible GPUs); one process only.
        batch_size (`int`, *optional*, defaults to 1):
            Prompts per `generate` call (left-padded).
        router_top_p (`float`, *optional*):
            The router's top-p for every sample (default: the release's `config.router_top_p`).
        template (`str`, *optional*):
            A chat template name instead of the release's evaluation template (e.g. `plain` for a stage-1/2 model).
        budget_log (`str`, *optional*):
            A JSON-lines file that receives one record per sample: task, split, doc id and the image-token budget of
            each of its images (with several processes, each writes `budget_log` + `.rank<N>`).
        trust_remote_code (`bool`, *optional*): accepted for symmetry with other models; the package's own classes
            are used.
        max_batch_size (`int`, *optional*): passed by lmms-eval to every model; unused.
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        dtype: str = "float32",
        device: str | None = None,
        device_map: str | None = None,
        batch_size: int | str = 1,
        router_top_p: float | str | None = None,
        template: str | None = None,
        budget_log: str | None = None,
        trust_remote_code: bool | str = False,
        max_batch_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if kwargs:
            raise ValueError(f"slime_hf: unknown model_args {sorted(kwargs)}")
        if dtype not in DTYPES:
            raise ValueError(f"slime_hf: dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        try:
            self.batch_size_per_process = int(batch_size)
        except (TypeError, ValueError):
            raise ValueError(f"slime_hf: batch_size must be a positive integer, got {batch_size!r}") from None
        if self.batch_size_per_process < 1:
            raise ValueError(f"slime_hf: batch_size must be a positive integer, got {batch_size!r}")
        try:
            self.router_top_p = None if router_top_p in (None, "", "None") else float(router_top_p)
        except (TypeError, ValueError):
            self.router_top_p = float("nan")
        if self.router_top_p is not None and not 0.0 < self.router_top_p <= 1.0:
            raise ValueError(f"slime_hf: router_top_p must be in (0, 1], got {router_top_p!r}")
        _as_bool(trust_remote_code, "trust_remote_code")
        self.template = template or None

        accelerator = Accelerator()
        self.accelerator = accelerator
        # lmms-eval shards the requests by the launcher's RANK / WORLD_SIZE (accelerate launch and torchrun set them;
        # accelerate reports a single process for torchrun on CPUs)
        self._rank = int(os.environ.get("RANK", accelerator.process_index))
        self._world_size = int(os.environ.get("WORLD_SIZE", accelerator.num_processes))
        load_kwargs: dict[str, Any] = {"dtype": DTYPES[dtype]}
        if self._world_size > 1:
            if device_map:
                raise ValueError("slime_hf: device_map spreads one model over devices; with several processes omit it")
            local_rank = int(os.environ.get("LOCAL_RANK", accelerator.local_process_index))
            self._device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
        elif device_map:
            load_kwargs["device_map"] = device_map
            self._device = None
        else:
            self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = SliMEForConditionalGeneration.from_pretrained(pretrained, **load_kwargs).eval()
        if self._device is not None:
            model.to(self._device)
        else:
            self._device = model.get_input_embeddings().weight.device
        self._model = model
        self.processor = SliMEProcessor.from_pretrained(pretrained)
        self.tokenizer = self.processor.tokenizer
        self.pretrained = pretrained

        self.budget_records: list[dict] = []
        self.budget_log = None
        if budget_log:
            self.budget_log = budget_log if self._world_size == 1 else f"{budget_log}.rank{self._rank}"
            os.makedirs(os.path.dirname(os.path.abspath(self.budget_log)), exist_ok=True)
            open(self.budget_log, "w", encoding="utf-8").close()

    @property
    def model(self) -> SliMEForConditionalGeneration:
        return self._model

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_process

    # -- inputs ------------------------------------------------------------------------------------------------------
    def _visuals(self, doc_to_visual, task: str, split: str, doc_id: int) -> list[Image.Image]:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else None
        visuals = [] if visuals is None else list(visuals)
        for visual in visuals:
            if not isinstance(visual, Image.Image):
                raise ValueError(
                    f"slime_hf evaluates images only; task {task!r} doc {doc_id} gave a {type(visual).__name__}"
                )
        return visuals

    def _prompt(self, context: str, num_images: int) -> str:
        if self.template:
            return render_prompt(self.processor, context, num_images, template=self.template)
        return render_prompt(self.processor, context, num_images)

    def _encode(self, prompts: Sequence[str], images: Sequence[list[Image.Image]]):
        has_images = any(images)
        inputs = self.processor(images=list(images) if has_images else None, text=list(prompts), return_tensors="pt")
        inputs = inputs.to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs

    def _record(self, task: str, split: str, doc_id: int, budgets: list[dict]) -> None:
        record = {"task": task, "split": split, "doc_id": int(doc_id), "images": budgets}
        self.budget_records.append(record)
        if self.budget_log:
            with open(self.budget_log, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")

    # -- generation --------------------------------------------------------------------------------------------------
    def _generation_kwargs(self, gen_kwargs: dict) -> tuple[dict, list[str]]:
        """lmms-eval's generation_kwargs -> `generate` arguments, plus the `until` strings. Greedy unless the task
        samples (`do_sample: true` or a positive temperature)."""
        gen_kwargs = dict(gen_kwargs)
        until = gen_kwargs.pop("until", None)
        if until is None:
            until = []
        elif isinstance(until, str):
            until = [until]
        elif not isinstance(until, (list, tuple)) or not all(isinstance(u, str) for u in until):
            raise ValueError(f"slime_hf: until must be a string or a list of strings, got {until!r}")
        temperature = float(gen_kwargs.get("temperature") or 0.0)
        do_sample = bool(gen_kwargs.get("do_sample", False)) or temperature > 0
        kwargs: dict[str, Any] = {
            "max_new_tokens": int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS),
            "num_beams": int(gen_kwargs.get("num_beams") or 1),
            "do_sample": do_sample,
        }
        if do_sample:
            kwargs["temperature"] = temperature if temperature > 0 else 1.0
            if gen_kwargs.get("top_p") is not None:
                kwargs["top_p"] = float(gen_kwargs["top_p"])
        else:  # the release generation configs sample: their sampling settings must not reach greedy decoding
            kwargs.update({name: None for name in _GREEDY_IGNORED})
        return kwargs, [u for u in until if u]

    @staticmethod
    def _cut(text: str, until: Iterable[str]) -> str:
        for stop in until:
            index = text.find(stop)
            if index != -1:
                text = text[:index]
        return text

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answers lmms-eval's `generate_until` requests in batches of `batch_size` (same generation settings per
        batch, longest prompts first), each answer cut at its task's first `until` string."""
        collator = lmms_utils.Collator(
            [request.args for request in requests], lambda args: (-len(args[0]), args[0]), grouping=True
        )
        results: list[str] = []
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="slime_hf generate")
        for chunk in collator.get_batched(n=self.batch_size, batch_fn=None):
            contexts, all_gen_kwargs, doc_to_visuals, doc_ids, tasks, splits = zip(*chunk)
            images = [self._visuals(v, t, s, d) for v, t, s, d in zip(doc_to_visuals, tasks, splits, doc_ids)]
            prompts = [self._prompt(context, len(imgs)) for context, imgs in zip(contexts, images)]
            kwargs, until = self._generation_kwargs(all_gen_kwargs[0])
            inputs = self._encode(prompts, images)
            output = self.model.generate(
                **inputs,
                router_top_p=self.router_top_p,
                pad_token_id=self.tokenizer.pad_token_id,
                return_dict_in_generate=True,
                **kwargs,
            )
            new_ids = output.sequences[:, inputs["input_ids"].shape[1] :]
            answers = self.processor.batch_decode(new_ids, skip_special_tokens=True)
            budgets = list(output.image_token_budget)
            for index, answer in enumerate(answers):
                count = len(images[index])
                self._record(tasks[index], splits[index], doc_ids[index], budgets[:count])
                budgets = budgets[count:]
                answer = self._cut(answer, until)
                results.append(answer)
                self.cache_hook.add_partial("generate_until", (contexts[index], all_gen_kwargs[index]), answer)
            progress.update(len(chunk))
        progress.close()
        return collator.get_original(results)

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("slime_hf answers single-turn tasks (generate_until and loglikelihood)")

    # -- log-likelihood ----------------------------------------------------------------------------------------------
    def continuation_logprobs(self, prompt: str, continuation: str, images: list[Image.Image]) -> tuple[float, bool]:
        """
        Sum of the log-probabilities of `continuation` after `prompt`, and whether greedy decoding would produce it.

        The images are routed on the prompt alone, as when generating an answer to it; the continuation's tokens
        follow the assembled prompt.

        Args:
            prompt (`str`): the rendered prompt (with one `<image>` per image).
            continuation (`str`): the text whose likelihood is measured.
            images (`list[PIL.Image.Image]`): the prompt's images in placeholder order.

        Returns:
            `tuple[float, bool]`: the summed log-probability and whether every continuation token is the argmax.
        """
        logprob, greedy, _ = self._score(prompt, continuation, images)
        return logprob, greedy

    @torch.no_grad()
    def _score(self, prompt: str, continuation: str, images: list[Image.Image]) -> tuple[float, bool, list[dict]]:
        context = self._encode([prompt], [images])
        full_ids = self._encode([prompt + continuation], [images])["input_ids"][0]
        prompt_ids = context["input_ids"][0]
        if len(full_ids) > len(prompt_ids) and torch.equal(full_ids[: len(prompt_ids)], prompt_ids):
            continuation_ids = full_ids[len(prompt_ids) :]
        else:  # the boundary merged into one token: the continuation is tokenised on its own
            continuation_ids = torch.tensor(
                self.tokenizer(continuation, add_special_tokens=False)["input_ids"], device=prompt_ids.device
            )
        if continuation_ids.numel() == 0:
            raise ValueError(f"slime_hf: the continuation {continuation!r} has no tokens")
        prepared = self.model.model.prepare_multimodal_inputs(
            context["input_ids"],
            context["attention_mask"],
            context.get("pixel_values"),
            context.get("image_sizes"),
            router_top_p=self.router_top_p,
            padding_side="left",
        )
        ids = torch.cat([prepared.input_ids, continuation_ids[None].to(prepared.input_ids.device)], dim=1)
        mask = torch.ones_like(ids)
        positions = torch.arange(ids.shape[1], device=ids.device)[None]
        logits = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            assembled_prompt_embeds=prepared.inputs_embeds,
            use_cache=False,
        ).logits
        start = prepared.input_ids.shape[1]
        scores = torch.log_softmax(logits[0, start - 1 : -1].float(), dim=-1)
        targets = ids[0, start:]
        logprob = float(scores.gather(-1, targets[:, None]).sum())
        greedy = bool((scores.argmax(-1) == targets).all())
        return logprob, greedy, list(prepared.image_token_budget or [])

    def loglikelihood(self, requests: list[Instance]) -> list:
        """Log-likelihood of each request's continuation (one request at a time), as `(logprob, is_greedy)`."""
        results = []
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="slime_hf loglikelihood")
        for context, doc_to_target, doc_to_visual, doc_id, task, split in [request.args for request in requests]:
            doc = self.task_dict[task][split][doc_id]
            continuation = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(doc)
            images = self._visuals(doc_to_visual, task, split, doc_id)
            prompt = self._prompt(context, len(images))
            logprob, greedy, budgets = self._score(prompt, continuation, images)
            results.append((logprob, greedy))
            self._record(task, split, doc_id, budgets)
            progress.update(1)
        progress.close()
        return wrap_loglikelihood_results(results)
