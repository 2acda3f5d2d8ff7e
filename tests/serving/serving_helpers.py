"""Helpers of the serving tests: the requests (text-only, one image, two images, router top-p 0.5), the reference
greedy ids from `SliMEForConditionalGeneration.generate` on the same model, and a server subprocess."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image


MAX_NEW_TOKENS = 12
STARTUP_TIMEOUT = 420
BLOCK_SIZE = 128  # KV-cache block of the session's server (the unit prefix caching shares)


def make_image(seed: int, size: tuple[int, int]) -> Image.Image:
    """A deterministic random RGB image of (width, height)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


# name -> (text, images as (seed, (width, height)), router_top_p)
CASES = {
    "text_only": ("Write one sentence about the sea.", [], None),
    "one_image": ("What is in this picture?", [(1, (500, 380))], None),
    "two_images": ("Compare the two pictures.", [(2, (340, 340)), (3, (700, 350))], None),
    "router_top_p_0.5": ("Describe the picture in detail.", [(4, (600, 450))], 0.5),
}


def case_images(name: str) -> list[Image.Image]:
    return [make_image(seed, size) for seed, size in CASES[name][1]]


def chat_body(name: str, stream: bool = False, max_tokens: int = MAX_NEW_TOKENS, **extra) -> dict:
    """The OpenAI request of a case: image parts first, then the text, as users write them."""
    text, _, router_top_p = CASES[name]
    content = [{"type": "image_url", "image_url": {"url": data_url(image)}} for image in case_images(name)]
    content.append({"type": "text", "text": text})
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "return_token_ids": True,
        "stream": stream,
        **extra,
    }
    if router_top_p is not None:
        body["router_top_p"] = router_top_p
    return body


class Reference:
    """Greedy ids of `SliMEForConditionalGeneration.generate` for the cases (computed once each)."""

    def __init__(self, folder: Path):
        from slime_hf import SliMEForConditionalGeneration, SliMEProcessor

        self.model = SliMEForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
        self.processor = SliMEProcessor.from_pretrained(folder)
        self._ids: dict = {}

    def inputs(self, name: str) -> dict:
        text, images, router_top_p = CASES[name]
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
        prompt = self.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
        images = case_images(name)
        inputs = self.processor(text=prompt, images=images or None, return_tensors="pt")
        return {**inputs, "router_top_p": router_top_p}

    def ids(self, name: str, max_new_tokens: int = MAX_NEW_TOKENS) -> list[int]:
        key = (name, max_new_tokens)
        if key not in self._ids:
            inputs = self.inputs(name)
            with torch.inference_mode():
                out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            self._ids[key] = out[0, inputs["input_ids"].shape[1] :].tolist()
        return self._ids[key]

    def margin_at_first_difference(self, name: str, served: list[int]) -> str:
        """Where served ids differ from the reference: the step and the reference's top-two logit margin there."""
        expected = self.ids(name)
        step = next((i for i, (a, b) in enumerate(zip(expected, served)) if a != b), min(len(expected), len(served)))
        inputs = self.inputs(name)
        prefix = torch.tensor([expected[:step]], dtype=torch.long)
        ids = torch.cat([inputs["input_ids"], prefix], dim=1)
        with torch.inference_mode():
            logits = self.model(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                pixel_values=inputs.get("pixel_values"),
                image_sizes=inputs.get("image_sizes"),
                router_top_p=inputs["router_top_p"],
            ).logits[0, -1]
        top = torch.topk(logits.float(), 2).values
        return f"{name}: first difference at step {step}, top-two logit margin {float(top[0] - top[1]):.3g}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`python -m slime_hf.serve` in a subprocess, on a free port of 127.0.0.1."""

    def __init__(self, process: subprocess.Popen, url: str, log: Path):
        self.process, self.url, self.log = process, url, log

    @classmethod
    def start(cls, model_dir: Path, export_dir: Path, extra_args: list[str] = (), env: dict | None = None):
        port = free_port()
        log = Path(export_dir) / "server.log"
        command = [
            sys.executable,
            "-m",
            "slime_hf.serve",
            "--model",
            str(model_dir),
            "--served-model-name",
            "tiny",
            "--port",
            str(port),
            "--dtype",
            "float32",
            "--enforce-eager",
            "--export-dir",
            str(export_dir / "decoder"),
            *extra_args,
        ]
        environment = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
        environment.update(env or {})
        with open(log, "wb") as handle:
            process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=environment)
        server = cls(process, f"http://127.0.0.1:{port}", log)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode}:\n{server.log_tail()}")
            try:
                if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                    server.started_after = STARTUP_TIMEOUT - (deadline - time.monotonic())
                    return server
            except httpx.HTTPError:
                pass
            time.sleep(1)
        server.stop()
        raise RuntimeError(f"the server did not start within {STARTUP_TIMEOUT} s:\n{server.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace").splitlines()
        return "\n".join(line for line in text if "detokenization error" not in line)[-6000:]

    def stop(self) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


def answer_ids(response: httpx.Response) -> list[list[int]]:
    """Token ids per choice of a non-streamed answer."""
    assert response.status_code == 200, response.text
    return [choice["token_ids"] for choice in sorted(response.json()["choices"], key=lambda c: c["index"])]


def stream_ids(lines: list[str]) -> tuple[list[list[int]], list[dict]]:
    """Token ids per choice and the parsed events of a streamed answer (SSE `data:` lines)."""
    import json

    events = [
        json.loads(line[len("data: ") :]) for line in lines if line.startswith("data: ") and line != "data: [DONE]"
    ]
    ids: dict = {}
    for event in events:
        for choice in event.get("choices", []):
            ids.setdefault(choice["index"], []).extend(choice.get("token_ids", []))
    return [ids[index] for index in sorted(ids)], events
