"""Image processors of SliME ("Beyond LLaVA-HD", arXiv 2406.08487).

Every image becomes a *global view* (the whole image squashed to 336x336) followed by 2 to 7 *local crops*
(the image resized, aspect ratio kept, onto a black canvas of whole 336x336 tiles chosen by
[`get_slice_grid`], then cut into tiles row-major). Two backends share the geometry:

- [`SliMEImageProcessorPil`] (default): Pillow resizes, bit-exact with the original implementation.
- [`SliMEImageProcessor`] (opt-in, `backend="torch"`): `torch.nn.functional.interpolate` resizes; faster,
  pixels differ from the original by a few uint8 levels.

This file is self-contained (torch, transformers, PIL, numpy and the standard library only) because it is
copied next to model weights and loaded with `trust_remote_code=True`.
"""

from __future__ import annotations

import functools
import io
import math
import operator
import os
import threading
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling
from transformers.processing_utils import ImagesKwargs, Unpack


TILE_SIZE = 336
"""Side of a view (global view and local crops) in pixels: the CLIP-L/14-336 input size."""

MAX_VIEWS = 8
"""Largest number of views of one image: 1 global view + at most 7 local crops."""

_MAX_SCALE = 6  # the grid rule clamps the tile count estimate to 6 (candidates still reach 7 crops)

# `auto_map["AutoImageProcessor"]` written by `save_pretrained`: a backend -> class dict, so that remote code
# resolves to the exact PIL backend by default (transformers asks for "torchvision" whenever torchvision is
# importable and falls back to the first entry) and to the torch backend with `backend="torch"`.
IMAGE_PROCESSOR_AUTO_MAP = {
    "pil": "image_processing_slime.SliMEImageProcessorPil",
    "torch": "image_processing_slime.SliMEImageProcessor",
}

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_URL_TIMEOUT_S = 30.0


# ----------------------------------------------------------------------------------------------------------------
# Geometry: pure functions of the image size, evaluated with the same Python float expressions, in the same order,
# as the original (several sizes change grid or resized size under exact rational arithmetic).
# ----------------------------------------------------------------------------------------------------------------


class SliceGeometry(NamedTuple):
    """
    How one image is sliced. All pairs are `(height, width)` / `(rows, columns)` / `(top, left)`.

    Attributes:
        grid (`tuple[int, int]`):
            `(rows, cols)` of local crops.
        canvas_size (`tuple[int, int]`):
            `(height, width)` of the black canvas, `(tile * rows, tile * cols)`.
        resized_size (`tuple[int, int]`):
            `(height, width)` the image is resized to (aspect ratio kept) before it is pasted on the canvas.
        paste_offset (`tuple[int, int]`):
            `(top, left)` where the resized image is pasted on the canvas.
        tile_size (`int`):
            Side of one crop.
    """

    grid: tuple[int, int]
    canvas_size: tuple[int, int]
    resized_size: tuple[int, int]
    paste_offset: tuple[int, int]
    tile_size: int

    @property
    def num_local_crops(self) -> int:
        """`int`: Number of local crops, `rows * cols` (2 to 7)."""
        return self.grid[0] * self.grid[1]

    @property
    def num_views(self) -> int:
        """`int`: Number of views, the global view plus the local crops (3 to 8)."""
        return self.grid[0] * self.grid[1] + 1


def _as_size(image_size: Any) -> tuple[int, int]:
    try:
        height, width = image_size
        height, width = operator.index(height), operator.index(width)
    except (TypeError, ValueError):
        raise ValueError(f"image_size must be two integers (height, width), got {image_size!r}.") from None
    if height <= 0 or width <= 0:
        raise ValueError(
            f"image_size must be positive, got (height, width) = ({height}, {width}): an image needs at least one "
            "pixel."
        )
    return height, width


def _factor_pairs(n: int) -> list[tuple[int, int]]:
    # (cols, rows) with ascending cols: the candidate order decides ties
    return [(i, n // i) for i in range(1, n + 1) if n % i == 0]


@functools.lru_cache(maxsize=4096)
def _geometry(height: int, width: int, tile: int) -> SliceGeometry:
    # Variable names follow PIL order (w, h); expressions are the original's.
    w, h = width, height
    scale = math.ceil(w * h / (tile * tile))
    if scale > _MAX_SCALE:
        scale = _MAX_SCALE
    elif scale == 1:
        scale = 2
    if scale == 2:
        candidates = _factor_pairs(2) + _factor_pairs(3)
    else:
        candidates = _factor_pairs(scale - 1) + _factor_pairs(scale) + _factor_pairs(scale + 1)

    best = candidates[0]
    best_effective = 0
    best_wasted = float("inf")
    for cols, rows in candidates:
        canvas_w, canvas_h = tile * cols, tile * rows
        s = min(canvas_w / w, canvas_h / h)
        effective = min(int(w * s) * int(h * s), w * h)
        wasted = canvas_w * canvas_h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best = (cols, rows)
            best_effective = effective
            best_wasted = wasted
    cols, rows = best  # a 1-pixel strip has zero effective area everywhere: the first candidate wins
    canvas_w, canvas_h = tile * cols, tile * rows

    scale_w, scale_h = canvas_w / w, canvas_h / h
    if scale_w < scale_h:
        new_w = canvas_w
        new_h = min(math.ceil(h * scale_w), canvas_h)
    else:
        new_h = canvas_h
        new_w = min(math.ceil(w * scale_h), canvas_w)
    return SliceGeometry(
        grid=(rows, cols),
        canvas_size=(canvas_h, canvas_w),
        resized_size=(new_h, new_w),
        paste_offset=((canvas_h - new_h) // 2, (canvas_w - new_w) // 2),
        tile_size=tile,
    )


def get_slice_geometry(image_size: tuple[int, int], tile_size: int = TILE_SIZE) -> SliceGeometry:
    """
    Computes how an image of the given size is sliced into local crops.

    Args:
        image_size (`tuple[int, int]`):
            `(height, width)` of the original image, positive integers.
        tile_size (`int`, *optional*, defaults to 336):
            Side of one crop.

    Returns:
        [`SliceGeometry`]: grid `(rows, cols)`, canvas size, resized size and paste offset.

    Raises:
        `ValueError`: if the size is not two positive integers.
    """
    height, width = _as_size(image_size)
    tile = operator.index(tile_size)
    if tile <= 0:
        raise ValueError(f"tile_size must be positive, got {tile_size!r}.")
    return _geometry(height, width, tile)


def get_slice_grid(image_size: tuple[int, int], tile_size: int = TILE_SIZE) -> tuple[int, int]:
    """
    The grid of local crops of an image: the one rule the processors slice with and the model reads the local
    features back with.

    Args:
        image_size (`tuple[int, int]`):
            `(height, width)` of the original image (a row of the processor's `image_sizes`).
        tile_size (`int`, *optional*, defaults to 336):
            Side of one crop.

    Returns:
        `tuple[int, int]`: `(rows, cols)`; `rows * cols` is between 2 and 7.

    Raises:
        `ValueError`: if the size is not two positive integers.
    """
    return get_slice_geometry(image_size, tile_size).grid


def get_num_views(image_size: tuple[int, int], tile_size: int = TILE_SIZE) -> int:
    """
    Number of views of an image: the global view plus its local crops.

    Args:
        image_size (`tuple[int, int]`):
            `(height, width)` of the original image.
        tile_size (`int`, *optional*, defaults to 336):
            Side of one crop.

    Returns:
        `int`: `rows * cols + 1`, between 3 and [`MAX_VIEWS`].
    """
    return get_slice_geometry(image_size, tile_size).num_views


# ----------------------------------------------------------------------------------------------------------------
# Loading and RGB conversion
# ----------------------------------------------------------------------------------------------------------------


class _BadImageError(ValueError):
    """A refused image; raised as is through the decoding guard."""


def _check_pixel_count(height: int, width: int, what: str) -> None:
    if height <= 0 or width <= 0:
        raise _BadImageError(
            f"Image {what} has zero area (height x width = {height} x {width}); every image needs at least one pixel."
        )
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and height * width > limit:
        raise _BadImageError(
            f"Image {what} has {height * width} pixels ({width} x {height}), more than PIL.Image.MAX_IMAGE_PIXELS = "
            f"{limit}: refused as a possible decompression bomb. Raise PIL.Image.MAX_IMAGE_PIXELS if the image is "
            "trusted."
        )


def _open_image(source: Any, what: str) -> Image.Image:
    """Opens and fully decodes an image file, path, URL or bytes, refusing corrupt data and decompression bombs."""
    opened_here = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if isinstance(source, (bytes, bytearray, memoryview)):
                fp = io.BytesIO(bytes(source))
            elif isinstance(source, str) and source.startswith(("http://", "https://")):
                with urllib.request.urlopen(source, timeout=_URL_TIMEOUT_S) as response:
                    fp = io.BytesIO(response.read())
            elif isinstance(source, (str, os.PathLike)):
                path = os.fspath(source)
                if not os.path.isfile(path):
                    raise _BadImageError(f"Image {what} is not a file (no such file: {path!r}).")
                fp = opened_here = open(path, "rb")
            else:
                fp = source  # a binary file-like object
            image = Image.open(fp)
            _check_pixel_count(image.height, image.width, what)
            image.load()
    except _BadImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ValueError(
            f"Image {what} exceeds PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS}: refused as a possible "
            f"decompression bomb ({err})."
        ) from err
    except Exception as err:  # PIL raises OSError, SyntaxError, EOFError, struct.error... on corrupt data
        raise ValueError(f"Cannot decode image {what}: {type(err).__name__}: {err}") from err
    finally:
        if opened_here is not None:
            opened_here.close()
    return image


def _scale_16_to_8(values: np.ndarray) -> np.ndarray:
    # Exact inverse of the 8 -> 16 bit expansion v * 257; never clips (the original's convert('RGB') clips at 255).
    return ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)


def convert_to_rgb(image: Image.Image) -> Image.Image:
    """
    Converts a PIL image to RGB the way SliME expects.

    As the original's `image.convert("RGB")`: L and P are expanded, LA/RGBA/PA lose their alpha channel without
    compositing, CMYK/YCbCr are converted. Deliberate fix: 16-bit images (`I;16*`, and `I` with values in
    [0, 65535]) are scaled to 8 bits with `v8 = (v16 + 128) // 257` first instead of being clipped at 255.

    Args:
        image (`PIL.Image.Image`):
            The image, in any mode.

    Returns:
        `PIL.Image.Image`: The image in mode RGB (the input itself when it already is RGB).

    Raises:
        `ValueError`: for float images (mode `F`), `I` images outside the 16-bit range, or modes Pillow cannot
        convert to RGB.
    """
    mode = image.mode
    if mode == "RGB":
        # Decode now: a lazily opened file must not be decoded by the two resize threads at once.
        try:
            image.load()
        except (OSError, SyntaxError) as err:
            raise ValueError(f"Cannot decode the image: {err}") from err
        return image
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        values = np.asarray(image)
        if mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(
                f"32-bit integer image (mode 'I') with values in [{values.min()}, {values.max()}]: only 16-bit data "
                "(0..65535) has a defined 8-bit scale. Convert the image to 8 bits first."
            )
        return Image.fromarray(_scale_16_to_8(values)).convert("RGB")
    if mode == "F":
        raise ValueError(
            "Float images (mode 'F') have no defined 8-bit scale: convert the image to 8 bits (e.g. mode 'L') first."
        )
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as err:
        raise ValueError(f"Cannot convert an image of mode {mode!r} to RGB: {err}") from err


def load_image(source: str | os.PathLike | bytes | Image.Image) -> Image.Image:
    """
    Opens an image the way the processors do: fully decoded, checked, converted with [`convert_to_rgb`]. As in
    the original, the EXIF orientation is not applied and only the first frame of multi-frame files is used.

    Args:
        source (`str`, `os.PathLike`, `bytes` or `PIL.Image.Image`):
            A file path, an `http(s)://` URL, encoded image bytes, a binary file object, or an image.

    Returns:
        `PIL.Image.Image`: The RGB image.

    Raises:
        `ValueError`: for a missing, corrupt or zero-area image, or one over `PIL.Image.MAX_IMAGE_PIXELS`.
    """
    if isinstance(source, Image.Image):
        image = source
        _check_pixel_count(image.height, image.width, "(PIL image)")
    else:
        image = _open_image(source, _describe(source))
    return convert_to_rgb(image)


def _describe(source: Any) -> str:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"from {len(source)} bytes"
    if isinstance(source, (str, os.PathLike)):
        return repr(os.fspath(source))
    return f"of type {type(source).__name__}"


def _channel_axis(shape: tuple[int, ...], default_first: bool, input_data_format: Any) -> bool:
    """Whether a 3-D array is channels-first; explicit `input_data_format` wins, else the shape decides."""
    if input_data_format is not None:
        fmt = str(getattr(input_data_format, "value", input_data_format))
        if fmt not in ("channels_first", "channels_last"):
            raise ValueError(f"input_data_format must be 'channels_first' or 'channels_last', got {fmt!r}.")
        return fmt == "channels_first"
    first_ok, last_ok = shape[0] in (1, 2, 3, 4), shape[-1] in (1, 2, 3, 4)
    if first_ok and last_ok:
        return default_first
    if first_ok or last_ok:
        return first_ok
    raise ValueError(
        f"Cannot find the channel axis of an image array of shape {tuple(shape)}: expected (H, W), (H, W, C) or "
        "(C, H, W) with C in 1 (L), 2 (LA), 3 (RGB), 4 (RGBA)."
    )


def _array_to_rgb_hwc(array: np.ndarray, input_data_format: Any, default_first: bool, what: str) -> np.ndarray:
    """(H, W), (H, W, C) or (C, H, W) uint8/uint16 array -> (H, W, 3) uint8, converted like `convert_to_rgb`."""
    if array.dtype.kind == "u" and array.dtype.itemsize == 2:  # uint16, either byte order
        array = _scale_16_to_8(array)
    elif array.dtype != np.uint8:
        raise ValueError(
            f"Image {what} is an array of dtype {array.dtype}; expected uint8 (0..255) or uint16 (0..65535). Float "
            "arrays are ambiguous (0..1 or 0..255): convert them to uint8 first."
        )
    if array.ndim == 2:
        array = array[:, :, None]
    elif array.ndim == 3:
        if _channel_axis(array.shape, default_first, input_data_format):
            array = array.transpose(1, 2, 0)
    else:
        raise ValueError(f"Image {what} is an array of shape {tuple(array.shape)}; expected 2 or 3 dimensions.")
    channels = array.shape[2]
    if channels not in (1, 2, 3, 4):
        raise ValueError(f"Image {what} has {channels} channels; expected 1 (L), 2 (LA), 3 (RGB) or 4 (RGBA).")
    _check_pixel_count(array.shape[0], array.shape[1], what)
    if channels == 3:
        return array
    if channels == 4:
        return array[:, :, :3]  # RGBA -> RGB drops alpha, as convert('RGB')
    return np.repeat(array[:, :, :1], 3, axis=2)  # L / LA -> RGB replicates the luminance


def _tensor_to_rgb_chw(tensor: torch.Tensor, input_data_format: Any, what: str) -> torch.Tensor:
    """(H, W), (C, H, W) or (H, W, C) uint8/uint16 tensor -> (3, H, W) uint8 on the same device (a view if possible)."""
    if tensor.dtype == getattr(torch, "uint16", None):
        tensor = ((tensor.to(torch.int32) + 128) // 257).to(torch.uint8)
    elif tensor.dtype != torch.uint8:
        raise ValueError(
            f"Image {what} is a tensor of dtype {tensor.dtype}; expected torch.uint8 (0..255). Float tensors are "
            "ambiguous (0..1 or 0..255): convert them to uint8 first."
        )
    if tensor.ndim == 2:
        tensor = tensor[None]
    elif tensor.ndim == 3:
        if not _channel_axis(tuple(tensor.shape), True, input_data_format):
            tensor = tensor.permute(2, 0, 1)
    else:
        raise ValueError(f"Image {what} is a tensor of shape {tuple(tensor.shape)}; expected 2 or 3 dimensions.")
    channels = tensor.shape[0]
    if channels not in (1, 2, 3, 4):
        raise ValueError(f"Image {what} has {channels} channels; expected 1 (L), 2 (LA), 3 (RGB) or 4 (RGBA).")
    _check_pixel_count(tensor.shape[1], tensor.shape[2], what)
    if channels == 3:
        return tensor
    if channels == 4:
        return tensor[:3]
    return tensor[:1].expand(3, -1, -1)


def _flatten_images(images: Any) -> list[Any]:
    """Flattens images, lists of images and lists of lists (one per sample) in order; 4-D arrays are batches."""
    flat: list[Any] = []

    def visit(item: Any) -> None:
        if isinstance(item, (list, tuple)):
            for sub in item:
                visit(sub)
        elif isinstance(item, (np.ndarray, torch.Tensor)) and item.ndim == 4:
            flat.extend(item[i] for i in range(item.shape[0]))
        else:
            flat.append(item)

    visit(images)
    if not flat:
        raise ValueError("No images were given: expected an image or a non-empty (nested) list of images.")
    return flat


def _is_source(item: Any) -> bool:
    return isinstance(item, (str, os.PathLike, bytes, bytearray, memoryview)) or hasattr(item, "read")


def _unsupported(item: Any, what: str) -> ValueError:
    return ValueError(
        f"Image {what} has unsupported type {type(item).__name__}: expected a PIL image, a numpy array or torch "
        "tensor (uint8), a file path or URL, encoded bytes, or a (nested) list of these."
    )


# ----------------------------------------------------------------------------------------------------------------
# Normalisation: x = float32(u * rescale_factor) (product in float64), then (x - mean) / std in float32. Exactly what
# the CLIP processor of the original computes per crop; done here once over all views.
# ----------------------------------------------------------------------------------------------------------------


class _Normalizer:
    def __init__(
        self,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
    ) -> None:
        self.do_rescale, self.do_normalize = do_rescale, do_normalize
        self.mean = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
        levels = np.broadcast_to(np.arange(256, dtype=np.uint8), (3, 1, 256))
        # The reference: every value the output can take, computed with the original's recipe.
        x = (levels * float(rescale_factor)).astype(np.float32) if do_rescale else levels.astype(np.float32)
        if do_normalize:
            x = (x - self.mean) / self.std
        self.table = np.ascontiguousarray(x.reshape(3, 256))
        # Fast path: cast, divide by float32(1 / rescale_factor), subtract, divide, in place. Used only when it
        # reproduces the reference for all 3 x 256 inputs, otherwise a table lookup keeps the output exact.
        self.divisor = np.float32(1.0 / rescale_factor) if do_rescale else None
        probe = np.empty((3, 1, 256), dtype=np.float32)
        self._fast(probe, levels)
        self.use_fast = bool(np.array_equal(probe.reshape(3, 256), self.table))
        # torch constants for the torch backend (same float32 operations)
        self.torch_divisor = float(self.divisor) if self.divisor is not None else None
        self.torch_mean = torch.from_numpy(self.mean.copy())
        self.torch_std = torch.from_numpy(self.std.copy())

    def _fast(self, dst: np.ndarray, src: np.ndarray) -> None:
        np.copyto(dst, src, casting="unsafe")
        if self.do_rescale:
            np.divide(dst, self.divisor, out=dst)
        if self.do_normalize:
            np.subtract(dst, self.mean, out=dst)
            np.divide(dst, self.std, out=dst)

    def __call__(self, dst: np.ndarray, src: np.ndarray) -> None:
        """Writes the normalised float32 values of uint8 `src` (..., 3, H, W) into `dst` of the same shape."""
        if self.use_fast:
            self._fast(dst, src)
        else:
            for c in range(3):
                np.take(self.table[c], src[..., c, :, :], out=dst[..., c, :, :])

    def torch_(self, views: torch.Tensor) -> torch.Tensor:
        """Normalises integral float32 levels (..., 3, H, W) in place (torch backend)."""
        if self.do_rescale:
            views.div_(self.torch_divisor)
        if self.do_normalize:
            views.sub_(self.torch_mean.to(views.device)).div_(self.torch_std.to(views.device))
        return views


@functools.lru_cache(maxsize=16)
def _get_normalizer(
    do_rescale: bool, rescale_factor: float, do_normalize: bool, mean: tuple, std: tuple
) -> _Normalizer:
    return _Normalizer(do_rescale, rescale_factor, do_normalize, mean, std)


def _size_repr(size: Any) -> Any:
    return None if size is None else {key: value for key, value in dict(size).items() if value is not None}


def _three(values: Any, name: str) -> tuple[float, float, float]:
    if isinstance(values, (int, float)):
        return (float(values),) * 3
    values = tuple(float(v) for v in values)
    if len(values) != 3:
        raise ValueError(f"{name} must have 3 values (R, G, B), got {len(values)}: {values}.")
    return values


# ----------------------------------------------------------------------------------------------------------------
# Worker threads (PIL backend): Pillow and numpy release the GIL, so independent resizes run in parallel.
# ----------------------------------------------------------------------------------------------------------------

_EXECUTOR_LOCK = threading.Lock()
_EXECUTOR: ThreadPoolExecutor | None = None
_EXECUTOR_KEY: tuple[int, int] = (0, 0)  # (pid, workers): a forked worker process must not reuse the parent's pool


def _get_executor(workers: int) -> ThreadPoolExecutor:
    global _EXECUTOR, _EXECUTOR_KEY
    with _EXECUTOR_LOCK:
        pid = os.getpid()
        if _EXECUTOR is None or _EXECUTOR_KEY[0] != pid or _EXECUTOR_KEY[1] < workers:
            if _EXECUTOR is not None and _EXECUTOR_KEY[0] == pid:
                _EXECUTOR.shutdown(wait=False)
            _EXECUTOR = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="slime-image")
            _EXECUTOR_KEY = (pid, workers)
        return _EXECUTOR


def _run_tasks(tasks: list[Callable[[], None]], num_threads: int) -> None:
    """Runs tasks (largest first) on the calling thread plus `num_threads - 1` workers."""
    if num_threads <= 1 or len(tasks) <= 1:
        for task in tasks:
            task()
        return
    pending = iter(tasks)
    lock = threading.Lock()

    def drain() -> None:
        while True:
            with lock:
                task = next(pending, None)
            if task is None:
                return
            task()

    workers = min(num_threads - 1, len(tasks) - 1)
    futures = [_get_executor(workers).submit(drain) for _ in range(workers)]
    try:
        drain()
    finally:
        errors = [f.exception() for f in futures]  # waits for every worker before the output is handed back
    for error in errors:
        if error is not None:
            raise error


def _resize_cost(in_hw: tuple[int, int], out_hw: tuple[int, int]) -> int:
    # rough cost of a separable resize: horizontal pass then vertical pass
    (in_h, in_w), (out_h, out_w) = in_hw, out_hw
    return in_h * max(in_w, out_w) + out_w * max(in_h, out_h)


@functools.lru_cache(maxsize=1)
def _default_num_threads() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))  # the CPUs this process may run on
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return 2 if cpus >= 2 else 1


# ----------------------------------------------------------------------------------------------------------------
# Shared processor logic
# ----------------------------------------------------------------------------------------------------------------


class SliMEImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    num_threads (`int`, *optional*):
        PIL backend: threads for the Pillow resizes (the global view and the crop canvas of each image are
        independent). `1` runs everything on the calling thread; `None` picks 2 on multi-core machines. The
        output does not depend on it. The torch backend ignores it (it uses torch's intra-op threads).
    """

    num_threads: int | None


class _SliMEImageProcessorMixin:
    """Geometry, input handling and output layout shared by both backends."""

    model_input_names = ["pixel_values", "image_sizes"]
    valid_kwargs = SliMEImageProcessorKwargs
    _auto_class = "AutoImageProcessor"

    resample = PILImageResampling.BICUBIC
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD
    size = {"height": TILE_SIZE, "width": TILE_SIZE}
    crop_size = {"height": TILE_SIZE, "width": TILE_SIZE}
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    do_convert_rgb = True
    num_threads = None

    def _defaults(self) -> dict[str, Any]:
        return {name: getattr(self, name, None) for name in self._valid_kwargs_names}

    def _check_config(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Validates the effective options of one call and returns what the pipeline needs."""
        size, crop_size = kwargs.get("size"), kwargs.get("crop_size")
        tile = crop_size.height if crop_size is not None else TILE_SIZE
        if not isinstance(tile, int) or tile <= 0:
            raise ValueError(f"crop_size must be a positive integer size, got {crop_size!r}.")
        for name, value in (("size", size), ("crop_size", crop_size)):
            if value is None:
                continue
            # {"shortest_edge": 336} is how the original's CLIP processor sizes the global view: also 336 x 336
            sides = (value.height, value.width) if value.shortest_edge is None else (value.shortest_edge,) * 2
            if sides != (tile, tile) or (value.shortest_edge is not None and value.height is not None):
                raise ValueError(
                    f"{name} must be square and equal to crop_size (the global view and the crops are stacked), got "
                    f"size={_size_repr(size)}, crop_size={_size_repr(crop_size)}."
                )
        if kwargs.get("do_convert_rgb") is False:
            raise ValueError("SliME images are always converted to RGB; do_convert_rgb=False is not supported.")
        data_format = kwargs.get("data_format")
        if data_format is not None and str(getattr(data_format, "value", data_format)) != "channels_first":
            raise ValueError(f"Only channels-first output is supported, got data_format={data_format!r}.")
        return_tensors = kwargs.get("return_tensors")
        return_tensors = str(getattr(return_tensors, "value", return_tensors)) if return_tensors is not None else "pt"
        if return_tensors not in ("pt", "np"):
            raise ValueError(f"return_tensors must be 'pt' or 'np', got {return_tensors!r}.")
        do_rescale = bool(kwargs.get("do_rescale"))
        do_normalize = bool(kwargs.get("do_normalize"))
        rescale_factor = float(kwargs["rescale_factor"]) if do_rescale else 1.0
        if do_rescale and not rescale_factor > 0:
            raise ValueError(f"rescale_factor must be positive, got {rescale_factor!r}.")
        mean = _three(kwargs["image_mean"], "image_mean") if do_normalize else (0.0, 0.0, 0.0)
        std = _three(kwargs["image_std"], "image_std") if do_normalize else (1.0, 1.0, 1.0)
        if do_normalize and any(s == 0 for s in std):
            raise ValueError(f"image_std must not contain zeros, got {std}.")
        num_threads = kwargs.get("num_threads")
        if num_threads is None:
            num_threads = _default_num_threads()
        elif not isinstance(num_threads, int) or num_threads < 1:
            raise ValueError(f"num_threads must be a positive integer or None, got {num_threads!r}.")
        resample = kwargs.get("resample")
        return {
            "tile": tile,
            "resample": PILImageResampling.BICUBIC if resample is None else resample,
            "return_tensors": return_tensors,
            "normalizer": _get_normalizer(do_rescale, rescale_factor, do_normalize, mean, std),
            "num_threads": num_threads,
            "input_data_format": kwargs.get("input_data_format"),
            "device": kwargs.get("device"),
        }

    def _preprocess_image_like_inputs(self, images: Any, *args: Any, **kwargs: Any) -> BatchFeature:
        options = self._check_config(kwargs)
        items = _flatten_images(images)
        prepared = [self._prepare_image(item, f"#{index}", options) for index, item in enumerate(items)]
        sizes = [self._image_hw(image) for image in prepared]
        geometries = [get_slice_geometry(hw, options["tile"]) for hw in sizes]
        pixel_values = self._slice_and_normalize(prepared, geometries, options)
        image_sizes = np.asarray(sizes, dtype=np.int64).reshape(len(sizes), 2)
        if options["return_tensors"] == "pt":
            image_sizes = torch.from_numpy(image_sizes)
            if isinstance(pixel_values, np.ndarray):
                pixel_values = torch.from_numpy(pixel_values)
            image_sizes = image_sizes.to(pixel_values.device)
        elif isinstance(pixel_values, torch.Tensor):
            pixel_values = pixel_values.cpu().numpy()
        return BatchFeature(data={"pixel_values": pixel_values, "image_sizes": image_sizes})

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        # transformers' PIL backend saves "SliMEImageProcessor" (it drops the "Pil" suffix); keep the real class so
        # that a saved folder names the backend it was saved with.
        output["image_processor_type"] = type(self).__name__
        auto_map = output.get("auto_map")
        if isinstance(auto_map, dict) and isinstance(auto_map.get("AutoImageProcessor"), str):
            prefix, _, name = auto_map["AutoImageProcessor"].rpartition(".")
            if name in ("SliMEImageProcessorPil", "SliMEImageProcessor") and prefix:
                auto_map = dict(auto_map)
                auto_map["AutoImageProcessor"] = {
                    "pil": f"{prefix}.SliMEImageProcessorPil",
                    "torch": f"{prefix}.SliMEImageProcessor",
                }
                output["auto_map"] = auto_map
        return output

    # backend hooks
    def _prepare_image(self, item: Any, what: str, options: dict[str, Any]) -> Any:
        raise NotImplementedError

    def _image_hw(self, image: Any) -> tuple[int, int]:
        raise NotImplementedError

    def _slice_and_normalize(
        self, images: list[Any], geometries: list[SliceGeometry], options: dict[str, Any]
    ) -> np.ndarray | torch.Tensor:
        raise NotImplementedError


_PREPROCESS_DOC = r"""
        Slices and normalises images into SliME views.

        Args:
            images (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor`, `str`, `os.PathLike`, `bytes`, or (nested) lists):
                The images. Arrays and tensors are uint8 (uint16 is scaled to 8 bits), `(H, W)`, `(H, W, C)` or
                `(C, H, W)` (numpy defaults to channels-last, torch to channels-first when the shape is ambiguous;
                `input_data_format` decides explicitly); 4-D arrays are batches. Strings are file paths or
                `http(s)://` URLs. A list of lists (one list per sample) is flattened in order.
            return_tensors (`str`, *optional*, defaults to `"pt"`):
                `"pt"` for torch tensors, `"np"` for numpy arrays.
            kwargs:
                Any option of the processor (`image_mean`, `image_std`, `rescale_factor`, `num_threads`, ...) for
                this call only.

        Returns:
            [`BatchFeature`]: with
            - **pixel_values** -- float32 `(num_images, max_views, 3, 336, 336)`: per image the global view, then
              the local crops row-major; zero-padded along views to the largest view count of the call.
            - **image_sizes** -- int64 `(num_images, 2)`: `(height, width)` of each original image.

        Raises:
            `ValueError`: for no images, zero-area, corrupt or oversized (`PIL.Image.MAX_IMAGE_PIXELS`) images,
            unsupported types, dtypes, shapes or modes, or inconsistent options.
"""


# The options both backends share, spelled once for both class docstrings.
_SHARED_ARGS_DOC = """        image_mean (`float` or `list[float]`, *optional*, defaults to the OpenAI CLIP mean):
            Per-channel mean subtracted after rescaling.
        image_std (`float` or `list[float]`, *optional*, defaults to the OpenAI CLIP std):
            Per-channel standard deviation the values are divided by.
        do_rescale (`bool`, *optional*, defaults to `True`):
            Whether to multiply the uint8 values by `rescale_factor`.
        rescale_factor (`float`, *optional*, defaults to `1/255`):
            Rescaling factor.
        do_normalize (`bool`, *optional*, defaults to `True`):
            Whether to normalise with `image_mean` and `image_std`.
        size (`dict[str, int]`, *optional*, defaults to `{"height": 336, "width": 336}`):
            Size of the global view; must equal `crop_size`.
        crop_size (`dict[str, int]`, *optional*, defaults to `{"height": 336, "width": 336}`):
            Size of one local crop (the tile of the grid rule).
"""


class SliMEImageProcessorPil(_SliMEImageProcessorMixin, PilBackend):
    r"""
        SliME image processor, Pillow backend (the default): bit-exact with the original implementation.

        Each image is converted to RGB ([`convert_to_rgb`]), then
        1. the global view is `image.resize((336, 336))` (Pillow bicubic; the aspect ratio is not kept);
        2. the image is resized with its aspect ratio kept ([`get_slice_geometry`]) and pasted on a black canvas of
           `rows x cols` tiles, which is cut into 336x336 crops row-major;
        3. all views are rescaled by `1/255` and normalised with the CLIP mean and std in one vectorised pass.

        The global-view resize and the crop-canvas resize of an image are independent: with `num_threads` > 1 (2 by
        default on multi-core machines) they run on two threads (Pillow releases the GIL). The output does not depend
        on the thread count.

        Args:
    {shared_args}        resample (`PILImageResampling`, *optional*, defaults to `BICUBIC`):
                Pillow filter of both resizes (bicubic in the original).
            num_threads (`int`, *optional*):
                Threads for the resizes; `None` picks 2 on multi-core machines, `1` disables threading.
    """

    def __init__(self, **kwargs: Unpack[SliMEImageProcessorKwargs]) -> None:
        super().__init__(**kwargs)
        self._check_config(self._defaults())

    def preprocess(self, images: Any, **kwargs: Unpack[SliMEImageProcessorKwargs]) -> BatchFeature:
        return super().preprocess(images, **kwargs)

    preprocess.__doc__ = _PREPROCESS_DOC

    def _prepare_image(self, item: Any, what: str, options: dict[str, Any]) -> Image.Image:
        if isinstance(item, Image.Image):
            _check_pixel_count(item.height, item.width, what)
            return convert_to_rgb(item)
        if isinstance(item, torch.Tensor):
            chw = _tensor_to_rgb_chw(item.detach().cpu(), options["input_data_format"], what)
            return Image.fromarray(np.ascontiguousarray(chw.permute(1, 2, 0).numpy()))
        if isinstance(item, np.ndarray):
            array = _array_to_rgb_hwc(item, options["input_data_format"], False, what)
            return Image.fromarray(np.ascontiguousarray(array))
        if _is_source(item):
            return convert_to_rgb(_open_image(item, f"{what} ({_describe(item)})"))
        raise _unsupported(item, what)

    def _image_hw(self, image: Image.Image) -> tuple[int, int]:
        return image.height, image.width

    def _slice_and_normalize(
        self, images: list[Image.Image], geometries: list[SliceGeometry], options: dict[str, Any]
    ) -> np.ndarray:
        tile, resample, normalize = options["tile"], options["resample"], options["normalizer"]
        max_views = max(g.num_views for g in geometries)
        # Zero-filled: padding views stay exactly zero; real views are overwritten in place, no stacking copies.
        out = np.zeros((len(images), max_views, 3, tile, tile), dtype=np.float32)
        tasks: list[tuple[int, Callable[[], None]]] = []
        for index, (image, geometry) in enumerate(zip(images, geometries)):
            hw = (image.height, image.width)
            tasks.append(
                (
                    _resize_cost(hw, (tile, tile)),
                    functools.partial(self._global_view, image, out[index, 0], tile, resample, normalize),
                )
            )
            tasks.append(
                (
                    _resize_cost(hw, geometry.resized_size) + geometry.num_local_crops * tile * tile,
                    functools.partial(self._local_crops, image, geometry, out[index], resample, normalize),
                )
            )
        tasks.sort(key=lambda task: -task[0])
        _run_tasks([task for _, task in tasks], options["num_threads"])
        return out

    @staticmethod
    def _global_view(image: Image.Image, dst: np.ndarray, tile: int, resample: int, normalize: _Normalizer) -> None:
        view = np.asarray(image.resize((tile, tile), resample))  # same size -> Pillow returns a copy
        normalize(dst, view.transpose(2, 0, 1))

    @staticmethod
    def _local_crops(
        image: Image.Image, geometry: SliceGeometry, dst: np.ndarray, resample: int, normalize: _Normalizer
    ) -> None:
        (rows, cols), (canvas_h, canvas_w) = geometry.grid, geometry.canvas_size
        (new_h, new_w), (top, left), tile = geometry.resized_size, geometry.paste_offset, geometry.tile_size
        resized = np.asarray(image.resize((new_w, new_h), resample))
        if (new_h, new_w) == (canvas_h, canvas_w):
            canvas = resized
        else:
            canvas = np.zeros((canvas_h, canvas_w, 3), dtype=np.uint8)  # black padding, as the original
            canvas[top : top + new_h, left : left + new_w] = resized
        # (H, W, 3) canvas -> (rows, cols, 3, tile, tile) crops: a strided view, read once by the normaliser
        crops = canvas.reshape(rows, tile, cols, tile, 3).transpose(0, 2, 4, 1, 3)
        normalize(dst[1 : 1 + rows * cols].reshape(rows, cols, 3, tile, tile), crops)


SliMEImageProcessorPil.__doc__ = SliMEImageProcessorPil.__doc__.format(shared_args=_SHARED_ARGS_DOC)


class SliMEImageProcessor(_SliMEImageProcessorMixin, BaseImageProcessor):
    r"""
        SliME image processor, torch backend (opt-in with `backend="torch"`): same geometry and normalisation as
        [`SliMEImageProcessorPil`], resizes with `torch.nn.functional.interpolate(mode="bicubic", antialias=True)`.
        Faster, also on GPU (`device=`), but not bit-exact: resized pixels differ from Pillow's by a few uint8 levels,
        which can change the router's kept tokens. Does not need torchvision.

        Args:
    {shared_args}        resample (`PILImageResampling`, *optional*, defaults to `BICUBIC`):
                Interpolation: `BICUBIC` or `BILINEAR` (antialiased) or `NEAREST`.
            num_threads (`int`, *optional*):
                Ignored by this backend (kept so that one configuration serves both backends).
    """

    _MODES = {
        PILImageResampling.BICUBIC: "bicubic",
        PILImageResampling.BILINEAR: "bilinear",
        PILImageResampling.NEAREST: "nearest-exact",
    }

    def __init__(self, **kwargs: Unpack[SliMEImageProcessorKwargs]) -> None:
        super().__init__(**kwargs)
        self._set_attributes(**kwargs)
        self._check_config(self._defaults())

    @property
    def backend(self) -> str:
        """`str`: The backend of this image processor."""
        return "torch"

    def preprocess(self, images: Any, **kwargs: Unpack[SliMEImageProcessorKwargs]) -> BatchFeature:
        return super().preprocess(images, **kwargs)

    preprocess.__doc__ = _PREPROCESS_DOC

    def _check_config(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        options = super()._check_config(kwargs)
        try:
            options["mode"] = self._MODES[PILImageResampling(options["resample"])]
        except (KeyError, ValueError):
            raise ValueError(
                f"The torch backend supports resample BICUBIC, BILINEAR or NEAREST, got {options['resample']!r}."
            ) from None
        return options

    def _prepare_image(self, item: Any, what: str, options: dict[str, Any]) -> torch.Tensor:
        if isinstance(item, torch.Tensor):
            image = _tensor_to_rgb_chw(item.detach(), options["input_data_format"], what)
        else:
            if isinstance(item, Image.Image):
                _check_pixel_count(item.height, item.width, what)
                array = np.asarray(convert_to_rgb(item))
            elif isinstance(item, np.ndarray):
                array = _array_to_rgb_hwc(item, options["input_data_format"], False, what)
            elif _is_source(item):
                array = np.asarray(convert_to_rgb(_open_image(item, f"{what} ({_describe(item)})")))
            else:
                raise _unsupported(item, what)
            if not array.flags.writeable:
                array = array.copy()
            # (H, W, 3) -> (3, H, W) view: channels-last memory, the fast layout of torch's uint8 resize
            image = torch.from_numpy(array).permute(2, 0, 1)
        if options["device"] is not None:
            image = image.to(options["device"])
        return image

    def _image_hw(self, image: torch.Tensor) -> tuple[int, int]:
        return int(image.shape[1]), int(image.shape[2])

    @staticmethod
    def _resize(image: torch.Tensor, size: tuple[int, int], mode: str, uint8_kernel: bool) -> torch.Tensor:
        """Resizes a (3, H, W) uint8 image to integral levels: uint8 with the uint8 kernel, else float32."""
        if tuple(image.shape[1:]) == tuple(size):
            return image
        batch = image[None]
        antialias = mode in ("bicubic", "bilinear")
        if uint8_kernel:
            # torch's CPU uint8 kernel (channels-last) rounds like Pillow's fixed-point one: closest and fastest
            batch = batch.contiguous(memory_format=torch.channels_last)
            return F.interpolate(batch, size=size, mode=mode, antialias=antialias)[0]
        resized = F.interpolate(batch.float(), size=size, mode=mode, antialias=antialias)
        return resized.round_().clamp_(0, 255)[0]

    def _slice_and_normalize(
        self, images: list[torch.Tensor], geometries: list[SliceGeometry], options: dict[str, Any]
    ) -> torch.Tensor:
        tile, mode, normalize = options["tile"], options["mode"], options["normalizer"]
        device = images[0].device
        uint8_kernel = device.type == "cpu"  # other devices resize in float32, then round and clamp
        if any(image.device != device for image in images):
            raise ValueError("All image tensors must be on the same device (or pass device=...).")
        max_views = max(g.num_views for g in geometries)
        out = torch.zeros((len(images), max_views, 3, tile, tile), dtype=torch.float32, device=device)
        for index, (image, geometry) in enumerate(zip(images, geometries)):
            (rows, cols), (canvas_h, canvas_w) = geometry.grid, geometry.canvas_size
            (new_h, new_w), (top, left) = geometry.resized_size, geometry.paste_offset
            views = out[index, : geometry.num_views]
            views[0].copy_(self._resize(image, (tile, tile), mode, uint8_kernel))
            resized = self._resize(image, (new_h, new_w), mode, uint8_kernel)
            if (new_h, new_w) == (canvas_h, canvas_w):
                canvas = resized
            else:
                canvas = torch.zeros((3, canvas_h, canvas_w), dtype=resized.dtype, device=device)
                canvas[:, top : top + new_h, left : left + new_w] = resized
            crops = canvas.unflatten(1, (rows, tile)).unflatten(3, (cols, tile)).permute(1, 3, 0, 2, 4)
            views[1:].view(rows, cols, 3, tile, tile).copy_(crops)
            normalize.torch_(views)
        return out


SliMEImageProcessor.__doc__ = SliMEImageProcessor.__doc__.format(shared_args=_SHARED_ARGS_DOC)


def register_image_processors(config_class: type) -> None:
    """
    Registers both image processors with `AutoImageProcessor` for `config_class`: the exact PIL backend under
    `"pil"` and the torch backend under its own key `"torch"` (never `"torchvision"`, which transformers would pick
    whenever torchvision is importable). `AutoImageProcessor.from_pretrained(path)` then returns
    [`SliMEImageProcessorPil`], and `AutoImageProcessor.from_pretrained(path, backend="torch")` returns
    [`SliMEImageProcessor`].

    Args:
        config_class (`type`):
            The model's configuration class (`SliMEConfig`).
    """
    from transformers import AutoImageProcessor

    AutoImageProcessor.register(
        config_class,
        image_processor_classes={"pil": SliMEImageProcessorPil, "torch": SliMEImageProcessor},
        exist_ok=True,
    )
    _default_to_pil_backend()


def _default_to_pil_backend() -> bool:
    """
    Makes `AutoImageProcessor.from_pretrained` without `backend=` ask for the PIL backend of SliME's processors.

    Works around a missing public API (transformers 5.17 to 5.25 at least): `AutoImageProcessor.register` takes the
    classes per backend but no default backend, and without an explicit one transformers asks for "torchvision"
    whenever torchvision is importable, then falls back to the PIL entry with a misleading "backend not available"
    warning. The only hook is the private module list `DEFAULT_TO_PIL_BACKEND_IMAGE_PROCESSORS` of
    `transformers.models.auto.image_processing_auto` (the Lanczos processors' list), which this appends SliME's
    class names to. The fallback still returns the PIL class if the list goes away; `tests/test_transformers_private.py`
    fails when transformers renames it or stops consulting it, so that this function gets revisited.

    Returns:
        `bool`: whether the list was found and holds SliME's class names.
    """
    from transformers.models.auto import image_processing_auto

    defaults = getattr(image_processing_auto, "DEFAULT_TO_PIL_BACKEND_IMAGE_PROCESSORS", None)
    if not isinstance(defaults, list):
        return False
    for name in ("SliMEImageProcessor", "SliMEImageProcessorPil"):
        if name not in defaults:
            defaults.append(name)
    return True


__all__ = [
    "IMAGE_PROCESSOR_AUTO_MAP",
    "MAX_VIEWS",
    "TILE_SIZE",
    "SliMEImageProcessor",
    "SliMEImageProcessorKwargs",
    "SliMEImageProcessorPil",
    "SliceGeometry",
    "convert_to_rgb",
    "get_num_views",
    "get_slice_geometry",
    "get_slice_grid",
    "load_image",
    "register_image_processors",
]
