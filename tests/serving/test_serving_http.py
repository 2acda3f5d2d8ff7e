"""The server over HTTP on 127.0.0.1: greedy answers equal `generate` on the same model (one at a time, 16 and 64
concurrent, streamed or not), the OpenAI surface, bad input answered 400 while the server keeps serving, and a client
that disconnects mid-stream frees its request."""

import asyncio
import base64
import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from serving_helpers import BLOCK_SIZE, CASES, answer_ids, chat_body, data_url, make_image, stream_ids


NAMES = list(CASES)


def post(server, body, **kwargs):
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=300, **kwargs)


@pytest.mark.parametrize("name", NAMES)
def test_greedy_answer_equals_generate(server, reference, name):
    response = post(server, chat_body(name))
    assert answer_ids(response) == [reference.ids(name)], reference.margin_at_first_difference(
        name, answer_ids(response)[0]
    )
    usage = response.json()["usage"]
    budget = usage["image_token_budget"]
    assert len(budget) == len(CASES[name][1])
    assert usage["prompt_tokens_details"]["image_tokens"] == sum(b["total"] for b in budget)
    assert usage["prompt_tokens"] == usage["prompt_tokens_details"]["text_tokens"] + sum(b["total"] for b in budget)
    assert usage["completion_tokens"] == len(reference.ids(name))


def test_router_top_p_keeps_fewer_local_tokens(server):
    full = post(server, {**chat_body("router_top_p_0.5"), "router_top_p": 1.0}).json()["usage"]
    half = post(server, chat_body("router_top_p_0.5")).json()["usage"]
    assert half["image_token_budget"][0]["local_kept"] < full["image_token_budget"][0]["local_kept"]
    assert half["image_token_budget"][0]["local_total"] == full["image_token_budget"][0]["local_total"]


@pytest.mark.parametrize("name", ["text_only", "two_images"])
def test_streamed_answer_equals_generate(server, reference, name):
    with httpx.stream(
        "POST",
        f"{server.url}/v1/chat/completions",
        json=chat_body(name, stream=True, stream_options={"include_usage": True}),
        timeout=300,
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    ids, events = stream_ids(lines)
    assert ids == [reference.ids(name)]
    assert lines[-1] == "data: [DONE]"
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-1]["usage"]["completion_tokens"] == len(reference.ids(name))
    finish = [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]]
    assert finish in (["length"], ["stop"])
    text = "".join(c["delta"].get("content", "") for e in events for c in e["choices"])
    nonstreamed = post(server, chat_body(name)).json()["choices"][0]["message"]["content"]
    assert text == nonstreamed


async def _concurrent(server, bodies):
    async with httpx.AsyncClient(timeout=600) as client:

        async def one(body):
            if not body["stream"]:
                return answer_ids(await client.post(f"{server.url}/v1/chat/completions", json=body))
            async with client.stream("POST", f"{server.url}/v1/chat/completions", json=body) as response:
                assert response.status_code == 200
                return stream_ids([line async for line in response.aiter_lines() if line])[0]

        return await asyncio.gather(*(one(body) for body in bodies))


@pytest.mark.parametrize("count", [16, 64])
def test_concurrent_mixed_requests_equal_their_single_answers(server, reference, count):
    names = [NAMES[i % len(NAMES)] for i in range(count)]
    bodies = [chat_body(name, stream=count == 64 and i % 2 == 1) for i, name in enumerate(names)]
    start = time.perf_counter()
    answers = asyncio.run(_concurrent(server, bodies))
    elapsed = time.perf_counter() - start
    print(f"\n{count} concurrent requests answered in {elapsed:.1f} s")
    assert len(answers) == count
    for name, ids in zip(names, answers):
        assert ids == [reference.ids(name)], reference.margin_at_first_difference(name, ids[0])
    front_end = httpx.get(f"{server.url}/health").json()["front_end"]
    assert front_end["largest_batch"] > 1, front_end  # the image work of concurrent requests ran together


def test_n_and_seeded_sampling(server, reference):
    greedy = post(server, chat_body("one_image", n=3))
    assert greedy.status_code == 400 and "needs sampling" in greedy.json()["error"]["message"]
    sampled = {"temperature": 1.0, "top_p": 0.9, "seed": 7, "n": 2}
    first = answer_ids(post(server, chat_body("text_only", **sampled)))
    second = answer_ids(post(server, chat_body("text_only", **sampled)))
    assert first == second and len(first) == 2


def test_max_completion_tokens_and_stop(server, reference):
    ids = answer_ids(post(server, {**chat_body("text_only"), "max_completion_tokens": 5}))
    assert ids == [reference.ids("text_only")[:5]]
    full = post(server, chat_body("text_only")).json()["choices"][0]["message"]["content"]
    stop = full[len(full) // 2 :][:3]
    if stop.strip():
        answer = post(server, {**chat_body("text_only"), "stop": [stop]}).json()["choices"][0]
        assert answer["finish_reason"] == "stop"
        assert answer["message"]["content"] == full[: full.index(stop)]


def test_models_and_health(server):
    models = httpx.get(f"{server.url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny"]
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok"


class _ImageHandler(BaseHTTPRequestHandler):
    """/one.png: the one-image case's picture; anything else answers after the server's fetch timeout (1 s)."""

    def do_GET(self):
        if self.path == "/one.png":
            buffer = io.BytesIO()
            make_image(*CASES["one_image"][1][0]).save(buffer, format="PNG")
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(buffer.getvalue())))
            self.end_headers()
            self.wfile.write(buffer.getvalue())
            return
        time.sleep(3)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def slow_image_url(image_server):
    return f"{image_server}/slow.png"


def test_image_fetched_over_http(server, reference, image_server):
    body = chat_body("one_image")
    body["messages"][0]["content"][0]["image_url"]["url"] = f"{image_server}/one.png"
    assert answer_ids(post(server, body)) == [reference.ids("one_image")]


def _with_content(content):
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 4}


def _bad_requests(slow_image_url, media_dir, tmp_path):
    image = {"type": "image_url", "image_url": {"url": data_url(make_image(5, (400, 300)))}}
    noise = make_image(6, (700, 700))  # random pixels do not compress: over 1 MB as PNG
    big = io.BytesIO()
    noise.save(big, format="PNG")
    outside = tmp_path / "outside.png"
    make_image(7, (64, 64)).save(outside)
    return {
        "malformed JSON": (b'{"messages": [', "not valid JSON"),
        "unknown content type": (_with_content([{"type": "input_audio", "input_audio": {}}]), "unknown content type"),
        "undecodable image": (
            _with_content(
                [
                    {
                        "type": "image_url",
                        "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"not an image").decode()},
                    }
                ]
            ),
            "cannot be decoded",
        ),
        "oversized image": (
            _with_content(
                [
                    {
                        "type": "image_url",
                        "image_url": {"url": "data:image/png;base64," + base64.b64encode(big.getvalue()).decode()},
                    }
                ]
            ),
            "over the limit",
        ),
        "more images than placeholders": (
            _with_content([image, image, {"type": "text", "text": "<image>\nOnly one placeholder."}]),
            "1 image placeholders but 2 images",
        ),
        "prompt over the length limit": (
            _with_content([image, {"type": "text", "text": "sea " * 5000}]),
            "over the model's length limit",
        ),
        "URL that times out": (
            _with_content([{"type": "image_url", "image_url": {"url": slow_image_url}}]),
            "timed out",
        ),
        "local path outside the allowed folder": (
            _with_content([{"type": "image_url", "image_url": {"url": f"file://{outside}"}}]),
            "outside the allowed folder",
        ),
        "bad sampling field": ({**_with_content("hi"), "temperature": "hot"}, "temperature must be a number"),
        "max_tokens over the room left": ({**_with_content("hi"), "max_tokens": 10**6}, "tokens left after the prompt"),
    }


def test_bad_input_is_a_400_naming_the_problem_and_the_server_keeps_serving(
    server, reference, slow_image_url, media_dir, tmp_path
):
    for label, (body, expected) in _bad_requests(slow_image_url, media_dir, tmp_path).items():
        if isinstance(body, bytes):
            response = httpx.post(f"{server.url}/v1/chat/completions", content=body, timeout=60)
        else:
            response = post(server, body)
        assert response.status_code == 400, (label, response.text)
        error = response.json()["error"]
        assert expected in error["message"], (label, error)
        assert error["type"] == "invalid_request_error"
    assert answer_ids(post(server, chat_body("one_image"))) == [reference.ids("one_image")]


def test_length_refused_before_the_vision_tower_runs(server):
    # Eight images need at least 8 * 578 positions, over the 4096 limit: refused by the bound checked before encoding
    # (the message of the check after routing reads "after routing").
    image = {"type": "image_url", "image_url": {"url": data_url(make_image(8, (336, 336)))}}
    response = post(server, _with_content([image] * 8 + [{"type": "text", "text": "Eight pictures."}]))
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert "needs at least" in message and "after routing" not in message


def test_local_image_under_the_allowed_folder(server, reference, media_dir):
    path = media_dir / "one.png"
    case_image = make_image(*CASES["one_image"][1][0])
    case_image.save(path)
    body = chat_body("one_image")
    body["messages"][0]["content"][0]["image_url"]["url"] = f"file://{path}"
    assert answer_ids(post(server, body)) == [reference.ids("one_image")]


def _wait_until_idle(server) -> dict:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        health = httpx.get(f"{server.url}/health").json()
        if health["running_requests"] == 0 and health.get("engine_requests") == 0:
            break
        time.sleep(0.2)
    return health


def test_client_going_away_before_a_long_answer_frees_its_request(server):
    body = {**chat_body("text_only", max_tokens=3000), "n": 4, "temperature": 1.0}
    before = httpx.get(f"{server.url}/health").json()["client_disconnects"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=httpx.Timeout(60, read=1.0))
    health = _wait_until_idle(server)
    assert health["running_requests"] == 0 and health["engine_requests"] == 0, health
    assert health["client_disconnects"] == before + 1  # given up, not answered to nobody


def test_client_disconnecting_mid_stream_frees_its_request(server):
    before = httpx.get(f"{server.url}/health").json()["client_disconnects"]
    body = chat_body("text_only", stream=True, max_tokens=3000)
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=300) as response:
        lines = response.iter_lines()
        received = [next(lines) for _ in range(6)]
    assert any(line.startswith("data: ") for line in received)
    health = _wait_until_idle(server)
    assert health["running_requests"] == 0 and health["engine_requests"] == 0, health
    assert health["client_disconnects"] == before + 1


def test_prefix_cache_shares_an_image_block_only_as_far_as_its_routing_allows(server, reference):
    """The global tokens and the separator do not depend on the text, the kept local tokens do: the same request
    again reuses every full KV block of its prompt; the same image with another question reuses the blocks up to the
    end of the global tokens and the separator, not the differently routed local tokens."""
    body = chat_body("router_top_p_0.5")
    post(server, body)
    same = post(server, body).json()["usage"]
    other = chat_body("router_top_p_0.5")
    other["messages"][0]["content"][-1]["text"] = "Which colours dominate?"
    routed = post(server, other).json()["usage"]
    budget, routed_budget = same["image_token_budget"][0], routed["image_token_budget"][0]
    assert budget["local_kept"] != routed_budget["local_kept"]  # another question, another routing
    ids = reference.inputs("router_top_p_0.5")["input_ids"][0].tolist()
    image_end_of_global = ids.index(reference.model.config.image_token_id) + budget["global"] + budget["separator"]
    # vLLM reuses whole blocks and always computes the prompt's last position
    assert same["prompt_tokens_details"]["cached_tokens"] == (same["prompt_tokens"] - 1) // BLOCK_SIZE * BLOCK_SIZE
    cached = routed["prompt_tokens_details"]["cached_tokens"]
    assert image_end_of_global // BLOCK_SIZE * BLOCK_SIZE <= cached < same["prompt_tokens_details"]["cached_tokens"]
