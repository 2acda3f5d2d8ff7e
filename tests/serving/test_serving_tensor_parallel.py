"""With --tensor-parallel-size 2 (two CPU worker processes) the greedy answers equal `generate`'s, one at a time and
concurrently. A differing step is reported with the reference's top-two logit margin there. This server also
requires an API key."""

import asyncio

import httpx
import pytest
from serving_helpers import CASES, ServerProcess, answer_ids, chat_body


@pytest.mark.slow
def test_tensor_parallel_2_answers_equal_generate(tiny_model_dir, reference, tmp_path):
    server = ServerProcess.start(
        tiny_model_dir,
        tmp_path,
        extra_args=["--tensor-parallel-size", "2", "--api-key", "test-key"],
        env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"},
    )
    auth = {"Authorization": "Bearer test-key"}
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            refused = httpx.post(f"{server.url}/v1/chat/completions", json=chat_body("text_only"), headers=headers)
            assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"
        assert httpx.get(f"{server.url}/v1/models").status_code == 401
        assert httpx.get(f"{server.url}/v1/models", headers=auth).json()["data"][0]["id"] == "tiny"
        differences = []
        for name in CASES:
            response = httpx.post(f"{server.url}/v1/chat/completions", json=chat_body(name), headers=auth, timeout=300)
            ids = answer_ids(response)[0]
            if ids != reference.ids(name):
                differences.append(reference.margin_at_first_difference(name, ids))

        async def together():
            async with httpx.AsyncClient(timeout=600, headers=auth) as client:
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
