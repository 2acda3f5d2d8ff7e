"""Images of chat requests: data URLs and base64, http(s) URLs fetched with size and time limits, local files only
under an explicitly allowed folder. Every failure is a `RequestError` naming the content part."""

from __future__ import annotations

import base64
import binascii
import io
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import RequestError


@dataclass
class ImageLimits:
    """Limits on the images of one request.

    Args:
        max_bytes (`int`): largest encoded image (bytes), from any source.
        max_pixels (`int`): largest decoded image (width * height).
        fetch_timeout (`float`): seconds allowed to fetch one http(s) image (connect and read together).
        allowed_local_dir (`str`, *optional*): local paths (`file://` URLs or absolute paths) are read only under this
            folder; without it they are refused.
    """

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 64 * 1024 * 1024
    fetch_timeout: float = 10.0
    allowed_local_dir: str | None = None


def decode_image(data: bytes, where: str, limits: ImageLimits):
    """Encoded bytes -> an RGB PIL image, or a `RequestError` saying why not."""
    from PIL import Image

    if len(data) > limits.max_bytes:
        raise RequestError(f"{where}: the image is {len(data)} bytes, over the limit of {limits.max_bytes}", where)
    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
        if width * height > limits.max_pixels:
            raise RequestError(
                f"{where}: the image is {width}x{height} pixels, over the limit of {limits.max_pixels} pixels", where
            )
        image = Image.open(io.BytesIO(data))
        image.load()
    except RequestError:
        raise
    except Exception as error:  # PIL raises several types for undecodable data
        raise RequestError(f"{where}: the image cannot be decoded ({type(error).__name__}: {error})", where) from None
    return image.convert("RGB")


def _decode_base64(text: str, where: str) -> bytes:
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{where}: the image data is not valid base64", where) from None


async def fetch_url(url: str, where: str, limits: ImageLimits) -> bytes:
    """Downloads an http(s) image, stopping at `limits.max_bytes` and after `limits.fetch_timeout` seconds."""
    import asyncio

    import httpx

    async def download() -> bytes:
        async with httpx.AsyncClient(timeout=limits.fetch_timeout, follow_redirects=True) as client:
            async with client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise RequestError(f"{where}: fetching {url} answered HTTP {response.status_code}", where)
                chunks, size = [], 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > limits.max_bytes:
                        raise RequestError(
                            f"{where}: the image at {url} is over the limit of {limits.max_bytes} bytes", where
                        )
                    chunks.append(chunk)
                return b"".join(chunks)

    try:
        return await asyncio.wait_for(download(), limits.fetch_timeout)
    except (asyncio.TimeoutError, httpx.TimeoutException):
        raise RequestError(f"{where}: fetching {url} timed out after {limits.fetch_timeout} s", where) from None
    except httpx.HTTPError as error:
        raise RequestError(f"{where}: fetching {url} failed ({type(error).__name__}: {error})", where) from None


def read_local(path_text: str, where: str, limits: ImageLimits) -> bytes:
    """Reads a local image file, only under `limits.allowed_local_dir`."""
    if limits.allowed_local_dir is None:
        raise RequestError(
            f"{where}: local image paths are refused (the server was started without --allowed-local-media-path)",
            where,
        )
    root = Path(limits.allowed_local_dir).resolve()
    path = Path(path_text).resolve()
    if not path.is_relative_to(root):
        raise RequestError(f"{where}: {path_text} is outside the allowed folder {root}", where)
    if not path.is_file():
        raise RequestError(f"{where}: no such image file: {path_text}", where)
    if path.stat().st_size > limits.max_bytes:
        raise RequestError(
            f"{where}: the image is {path.stat().st_size} bytes, over the limit of {limits.max_bytes}", where
        )
    return path.read_bytes()


async def load_image(url: str, where: str, limits: ImageLimits):
    """An `image_url` of a request (data URL, bare base64, http(s) URL, `file://` URL or absolute path) -> RGB image."""
    if not isinstance(url, str) or not url:
        raise RequestError(f"{where}: image_url.url must be a non-empty string", where)
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if not header.endswith(";base64") or not payload:
            raise RequestError(f"{where}: a data URL must be data:<type>;base64,<data>", where)
        data = _decode_base64(payload, where)
    elif url.startswith(("http://", "https://")):
        data = await fetch_url(url, where, limits)
    elif url.startswith("file://"):
        data = read_local(url[len("file://") :], where, limits)
    elif os.path.isabs(url):
        data = read_local(url, where, limits)
    else:
        data = _decode_base64(url, where)
    return decode_image(data, where, limits)
