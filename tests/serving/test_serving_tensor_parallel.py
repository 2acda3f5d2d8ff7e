"""With --tensor-parallel-size 2 (two CPU worker processes) the greedy answers equal `generate`'s, one at a time and
concurrently. A differing step is reported with the reference's top-two logit margin there."""

import asyncio

import httpx
import pytest
from serving_helpers import CASES, ServerProcess, answer_ids, chat_body


@pytest.mark.slow
def test_tensor_parallel_2_answers_equal_generate(tiny_model_dir, reference, tmp_path):
    server = ServerProcess.start(
        tiny_model_dir,
        tmp_path,
        extra_args=["--tensor-parallel-size", "2"],
        env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"},
    )
    try:
        differences = []
        for name in CASES:
            ids = answer_ids(httpx.post(f"{server.url}/v1/chat/completions", json=chat_body(name), timeout=300))[0]
            if ids != reference.ids(name):
                differences.append(reference.margin_at_first_difference(name, ids))

        async def together():
            async with httpx.AsyncClient(timeout=600) as client:
                responses = await asyncio.gather(
                    *(client.post(f"{server.url}/v1/chat/completions", json=chat_body(name)) for name in CASES)
                )
            return [answer_ids(response)[0] for response in responses]

        for name, ids in zip(CASES, asyncio.run(together())):
            if ids != reference.ids(name):
                differences.append("concurrent " + reference.margin_at_first_difference(name, ids))
        assert not differences, differences
    finally:
        assert server.stop() == 0, server.log_tail()
