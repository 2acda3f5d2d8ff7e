"""vLLM's async engine running SliME's exported language model from `prompt_embeds`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch


@dataclass
class EngineOptions:
    """How the language model runs in vLLM.

    Args:
        tensor_parallel_size (`int`): GPUs (or CPU worker processes) the model is split over.
        pipeline_parallel_size (`int`): pipeline stages.
        dtype (`str`): the engine's dtype (`"auto"` takes the exported weights' dtype).
        max_model_len (`int`, *optional*): longest sequence (prompt and answer); defaults to the model's.
        gpu_memory_utilization (`float`): share of GPU memory vLLM may take (CUDA).
        enforce_eager (`bool`): no CUDA graphs / compilation (faster start, slower decoding).
        enable_prefix_caching (`bool`): share KV blocks of equal prompt prefixes across requests.
        max_num_seqs (`int`, *optional*): most sequences decoded together.
        block_size (`int`, *optional*): tokens per KV-cache block (the unit prefix caching shares); vLLM's default.
        seed (`int`): the engine's seed.
    """

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    dtype: str = "auto"
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9
    enforce_eager: bool = False
    enable_prefix_caching: bool = True
    max_num_seqs: int | None = None
    block_size: int | None = None
    seed: int = 0


def start_engine(model_dir: str, options: EngineOptions):
    """Starts vLLM's `AsyncLLM` on an exported decoder folder, accepting `prompt_embeds`."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    kwargs = dict(
        model=str(model_dir),
        tokenizer=str(model_dir),
        enable_prompt_embeds=True,
        tensor_parallel_size=options.tensor_parallel_size,
        pipeline_parallel_size=options.pipeline_parallel_size,
        dtype=options.dtype,
        max_model_len=options.max_model_len,
        gpu_memory_utilization=options.gpu_memory_utilization,
        enforce_eager=options.enforce_eager,
        enable_prefix_caching=options.enable_prefix_caching,
        seed=options.seed,
    )
    if options.max_num_seqs is not None:
        kwargs["max_num_seqs"] = options.max_num_seqs
    if options.block_size is not None:
        kwargs["block_size"] = options.block_size
    return AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))


def sampling_params(
    n: int,
    temperature: float,
    top_p: float,
    max_tokens: int,
    stop: list[str],
    seed: int | None,
):
    """vLLM `SamplingParams` for one request (cumulative outputs: the server computes its own deltas)."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import RequestOutputKind

    try:
        return SamplingParams(
            n=n,
            temperature=temperature,
            top_p=top_p,
            max_tokens=max_tokens,
            stop=stop or None,
            seed=seed,
            output_kind=RequestOutputKind.CUMULATIVE,
        )
    except VLLMValidationError as error:
        raise ValueError(str(error)) from None


def generate(engine, prompt_embeds: torch.Tensor, params, request_id: str) -> AsyncIterator:
    """vLLM's stream of `RequestOutput`s for one assembled prompt. Close it (`contextlib.aclosing`) when stopping
    early: closing aborts the engine request."""
    return engine.generate({"prompt_embeds": prompt_embeds}, params, request_id)
