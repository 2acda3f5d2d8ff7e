"""SIGTERM: the server refuses new work, lets running requests finish within --shutdown-timeout (5 s here), cancels
the rest with an error chunk and exits 0. Ends the session's server, so it runs after the other HTTP tests."""

import json
import signal
import threading
import time

import httpx
from serving_helpers import answer_ids, chat_body


def test_sigterm_drains_then_cancels_and_exits_zero(server, reference):
    results = {}
    streaming = threading.Event()

    def long():  # thousands of tokens with n=4: cannot finish within the grace period
        body = chat_body("text_only", stream=True, max_tokens=3900, n=4, temperature=1.0, seed=0)
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=120) as response:
            results["long_status"] = response.status_code
            lines = []
            for line in response.iter_lines():
                streaming.set()
                if line:
                    lines.append(line)
            results["long"] = lines

    def short():  # a hundred tokens: finishes within the grace period
        body = chat_body("one_image", max_tokens=100)
        results["short"] = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120)

    threads = [threading.Thread(target=long), threading.Thread(target=short)]
    threads[0].start()
    assert streaming.wait(60), results
    threads[1].start()
    deadline = time.monotonic() + 60
    while httpx.get(f"{server.url}/health").json()["running_requests"] < 2:
        assert time.monotonic() < deadline and "short" not in results, results
        time.sleep(0.01)
    server.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    try:  # no new work: the listening socket is closed (or, in the moment before, the answer is 503)
        refused = httpx.post(f"{server.url}/v1/chat/completions", json=chat_body("text_only"), timeout=10).status_code
    except httpx.TransportError:
        refused = "connection refused"
    assert refused in (503, "connection refused")
    for thread in threads:
        thread.join(120)
    assert server.process.wait(60) == 0, server.log_tail()

    assert answer_ids(results["short"]) == [reference.ids("one_image", 100)]  # finished within the grace period
    assert results["long_status"] == 200
    lines = results["long"]
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2][len("data: ") :])
    assert "shut down" in error["error"]["message"], lines[-3:]
    assert "shutting down: 2 running request(s)" in server.log.read_text(errors="replace")
