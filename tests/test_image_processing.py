"""SliME image processors: geometry, pixels against the goldens, input handling, saving and Auto classes."""

import hashlib
import io
import json
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import python_env, run_python
from slime_hf.image_processing_slime import (
    IMAGE_PROCESSOR_AUTO_MAP,
    MAX_VIEWS,
    TILE_SIZE,
    SliMEImageProcessor,
    SliMEImageProcessorPil,
    _get_normalizer,
    convert_to_rgb,
    get_num_views,
    get_slice_geometry,
    get_slice_grid,
    load_image,
    register_image_processors,
)


CASE_FILES = ("case1.npz", "case2.npz", "case3.npz", "case4.npz")
# The torch backend resizes with torch's bicubic kernel: a few uint8 levels off Pillow (measured max 0.21).
TORCH_SANITY_BOUND = 0.3


def sha256_f32(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array, "<f4").tobytes()).hexdigest()


def sha256_f16(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array, "<f2").tobytes()).hexdigest()


@pytest.fixture(scope="module")
def common(fixtures_dir):
    return fixtures_dir / "common"


@pytest.fixture(scope="module")
def goldens(common):
    return json.loads((common / "processor_goldens.json").read_text())


@pytest.fixture(scope="module")
def golden_images(goldens):
    return {entry["file"]: entry for entry in goldens["images"]}


@pytest.fixture(scope="module")
def pil_processor():
    return SliMEImageProcessorPil()


@pytest.fixture(scope="module")
def torch_processor():
    return SliMEImageProcessor()


def _rgb(common, name):
    with Image.open(common / "images" / name) as image:
        return image.convert("RGB")


# ---------------------------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------------------------


def _geometry_cases(goldens):
    return [(entry.get("file") or str(entry["size"]), entry) for entry in goldens["images"] + goldens["grid_cases"]]


def test_geometry_matches_goldens(goldens):
    cases = _geometry_cases(goldens)
    assert len(cases) == 12 + 47
    sensitive = 0
    for label, entry in cases:
        width, height = entry["size"]  # goldens: [width, height]; grids [cols, rows]
        geometry = get_slice_geometry((height, width))
        cols, rows = entry["grid"]
        assert geometry.grid == (rows, cols), label
        assert get_slice_grid((height, width)) == (rows, cols), label
        assert tuple(entry["get_anyres_image_grid_shape"]) == (cols, rows), label
        assert geometry.canvas_size == (entry["best_resolution"][1], entry["best_resolution"][0]), label
        assert geometry.canvas_size == (entry["padded_size"][1], entry["padded_size"][0]), label
        assert geometry.resized_size == (entry["resized_size"][1], entry["resized_size"][0]), label
        assert geometry.paste_offset == (entry["paste_offset"][1], entry["paste_offset"][0]), label
        assert geometry.num_local_crops == entry["num_local_crops"], label
        assert geometry.num_views == entry["num_crops"] == get_num_views((height, width)), label
        assert 3 <= geometry.num_views <= MAX_VIEWS
        if "crop_boxes" in entry:
            boxes = [
                [x, y, x + TILE_SIZE, y + TILE_SIZE]
                for y in range(0, geometry.canvas_size[0], TILE_SIZE)
                for x in range(0, geometry.canvas_size[1], TILE_SIZE)
            ]
            assert boxes == entry["crop_boxes"], label
        sensitive += bool(entry.get("float64_sensitive"))
    assert sensitive >= 9  # the float64-sensitive sizes are part of the check


@pytest.mark.parametrize(
    "size", [(0, 10), (10, 0), (0, 0), (-3, 10), (10, -1), (1.5, 10), ("a", 3), (5,), None, (1, 2, 3)]
)
def test_geometry_rejects_bad_sizes(size):
    with pytest.raises(ValueError, match="image_size"):
        get_slice_grid(size)


def test_geometry_accepts_integer_like_sizes():
    expected = get_slice_grid((672, 1344))
    assert expected == (2, 3)
    assert get_slice_grid((np.int64(672), np.int64(1344))) == expected
    assert get_slice_grid(torch.tensor([672, 1344])) == expected
    assert get_slice_grid([672, 1344]) == expected


# ---------------------------------------------------------------------------------------------------------------
# Pixels, PIL backend: bit-exact with the goldens
# ---------------------------------------------------------------------------------------------------------------


def test_normalizer_is_the_exact_recipe():
    """The vectorised normalisation equals float32(u * (1/255) in float64), then (x - mean) / std in float32."""
    processor = SliMEImageProcessorPil()
    normalizer = _get_normalizer(
        True, processor.rescale_factor, True, tuple(processor.image_mean), tuple(processor.image_std)
    )
    assert normalizer.use_fast
    levels = np.arange(256, dtype=np.uint8)
    x = (levels * 0.00392156862745098).astype(np.float32)
    mean = np.asarray(processor.image_mean, dtype=np.float32)[:, None]
    std = np.asarray(processor.image_std, dtype=np.float32)[:, None]
    reference = (x[None, :] - mean) / std
    src = np.ascontiguousarray(np.broadcast_to(levels, (2, 3, 1, 256)))
    dst = np.empty(src.shape, dtype=np.float32)
    normalizer(dst, src)
    assert np.array_equal(dst[0, :, 0], reference) and np.array_equal(dst[1, :, 0], reference)
    # torch backend: the same float32 operations
    views = torch.from_numpy(src.astype(np.float32))
    normalizer.torch_(views)
    assert np.array_equal(views.numpy()[0, :, 0], reference)


@pytest.mark.parametrize("num_threads", [1, 2])
def test_pil_backend_case_files_bit_exact(common, goldens, golden_images, num_threads):
    processor = SliMEImageProcessorPil(num_threads=num_threads)
    for case in CASE_FILES:
        name = goldens["case_files"][case]
        golden = np.load(common / case)["pixel_values"]
        out = processor(str(common / "images" / name))
        pixel_values = out["pixel_values"]
        assert isinstance(pixel_values, torch.Tensor) and pixel_values.dtype == torch.float32
        assert pixel_values.shape == (1, golden.shape[0], 3, TILE_SIZE, TILE_SIZE)
        ours = pixel_values[0].numpy()
        assert np.abs(ours - golden).max() <= 1e-5, name
        assert sha256_f32(ours) == golden_images[name]["sha256_float32"], f"{name} is not bit-exact"
        width, height = golden_images[name]["image_sizes_value"]
        assert out["image_sizes"].tolist() == [[height, width]]
        assert out["image_sizes"].dtype == torch.int64


@pytest.mark.parametrize("num_threads", [1, 2])
def test_pil_backend_fp16_goldens(common, goldens, golden_images, num_threads):
    """The 8 other images (L, P and RGBA among them; the processor converts them itself)."""
    processor = SliMEImageProcessorPil(num_threads=num_threads)
    stored = np.load(common / goldens["fp16_file"]["file"])
    assert len(goldens["fp16_file"]["keys"]) == 8
    for stem, name in goldens["fp16_file"]["keys"].items():
        with Image.open(common / "images" / name) as image:
            image.load()
            out = processor(image)  # raw mode: L / P / RGBA are converted by the processor
        ours = out["pixel_values"][0].numpy()
        golden = stored[stem]
        assert ours.shape == golden.shape, name
        assert np.abs(ours.astype(np.float16).astype(np.float32) - golden.astype(np.float32)).max() <= 2e-3, name
        assert np.array_equal(ours.astype(np.float16), golden), name  # expected: identical
        assert sha256_f16(ours.astype(np.float16)) == golden_images[name]["sha256_float16"], name
        assert sha256_f32(ours) == golden_images[name]["sha256_float32"], name


def test_pil_backend_batch_matches_single_images(common, golden_images, pil_processor):
    """All 12 images in one call: each row bit-exact, zero padding after its own views."""
    names = sorted(golden_images)
    out = pil_processor([str(common / "images" / name) for name in names])
    pixel_values = out["pixel_values"].numpy()
    assert pixel_values.shape == (12, MAX_VIEWS, 3, TILE_SIZE, TILE_SIZE)
    for row, name in enumerate(names):
        views = golden_images[name]["num_crops"]
        assert sha256_f32(pixel_values[row, :views]) == golden_images[name]["sha256_float32"], name
        assert not pixel_values[row, views:].any(), name
        width, height = golden_images[name]["size"]
        assert out["image_sizes"][row].tolist() == [height, width]


# ---------------------------------------------------------------------------------------------------------------
# Torch backend: same geometry, near pixels
# ---------------------------------------------------------------------------------------------------------------


def test_torch_backend_close_to_goldens(common, goldens, golden_images, torch_processor, pil_processor):
    stored = np.load(common / goldens["fp16_file"]["file"])
    report = []
    for name, entry in sorted(golden_images.items()):
        image = _rgb(common, name)
        out = torch_processor(image)
        assert out["pixel_values"].dtype == torch.float32
        assert out["image_sizes"].tolist() == [[entry["size"][1], entry["size"][0]]]
        ours = out["pixel_values"][0].numpy()
        assert ours.shape == tuple(entry["pixel_values_shape"]), name
        if entry["stored_in"].startswith("case"):
            golden = np.load(common / entry["stored_in"].split(":")[0])["pixel_values"]
        else:
            golden = stored[entry["stem"]].astype(np.float32)
        diff = float(np.abs(ours - golden).max())
        report.append(f"{name}: {diff:.4f}")
        assert diff < TORCH_SANITY_BOUND, name
        if name == "square_336.png":  # no resampling at all: exact for any backend
            assert sha256_f32(ours) == entry["sha256_float32"]
    print("\ntorch backend max |diff| vs goldens: " + ", ".join(report))


def test_torch_backend_float_kernel(common):
    """The float32 path (used off CPU, where torch has no uint8 antialiased kernel) stays within a few levels."""
    image = torch.from_numpy(np.asarray(_rgb(common, "wide_1344x672.png")).copy()).permute(2, 0, 1)
    for size in ((336, 336), (504, 1008)):
        as_uint8 = SliMEImageProcessor._resize(image, size, "bicubic", uint8_kernel=True)
        as_float = SliMEImageProcessor._resize(image, size, "bicubic", uint8_kernel=False)
        assert as_float.dtype == torch.float32 and torch.equal(as_float, as_float.round())
        assert (as_float - as_uint8.float()).abs().max() <= 16


def test_torch_backend_batch_layout_and_inputs(common, torch_processor):
    wide, square = _rgb(common, "wide_1344x672.png"), _rgb(common, "square_336.png")
    single = torch_processor(wide)["pixel_values"][0]
    out = torch_processor([[wide], [square, torch.from_numpy(np.asarray(wide).copy()).permute(2, 0, 1)]])
    assert out["pixel_values"].shape == (3, 7, 3, TILE_SIZE, TILE_SIZE)
    assert out["image_sizes"].tolist() == [[672, 1344], [336, 336], [672, 1344]]
    assert torch.equal(out["pixel_values"][0], single)
    assert torch.equal(out["pixel_values"][2], single)  # CHW tensor input == PIL input
    assert not out["pixel_values"][1, 3:].any()
    as_numpy = torch_processor(wide, return_tensors="np", device="cpu")
    assert isinstance(as_numpy["pixel_values"], np.ndarray) and as_numpy["pixel_values"].dtype == np.float32
    assert np.array_equal(as_numpy["pixel_values"][0], single.numpy())


# ---------------------------------------------------------------------------------------------------------------
# Output layout and input types
# ---------------------------------------------------------------------------------------------------------------


def test_output_layout_padding_and_order(common, pil_processor):
    wide, square, banner = (_rgb(common, n) for n in ("wide_1344x672.png", "square_336.png", "banner_3000x250.png"))
    singles = [pil_processor(image)["pixel_values"][0] for image in (wide, square, banner)]
    out = pil_processor([[wide, square], [], [banner]])  # one list per sample, flattened in order
    assert set(out.keys()) == {"pixel_values", "image_sizes"}
    assert out["pixel_values"].shape == (3, 8, 3, TILE_SIZE, TILE_SIZE)
    assert out["image_sizes"].tolist() == [[672, 1344], [336, 336], [250, 3000]]
    for row, single in enumerate(singles):
        views = single.shape[0]
        assert torch.equal(out["pixel_values"][row, :views], single)
        assert not out["pixel_values"][row, views:].any()
    assert singles[0].shape[0] == 7 and singles[1].shape[0] == 3 and singles[2].shape[0] == 8
    as_numpy = pil_processor([wide, square], return_tensors="np")
    assert isinstance(as_numpy["pixel_values"], np.ndarray) and as_numpy["pixel_values"].shape == (2, 7, 3, 336, 336)
    assert as_numpy["image_sizes"].dtype == np.int64


def test_input_types_give_identical_pixels(common, tmp_path, pil_processor, torch_processor):
    path = common / "images" / "odd_337x211.png"
    image = _rgb(common, "odd_337x211.png")
    hwc = np.asarray(image).copy()
    chw_tensor = torch.from_numpy(hwc).permute(2, 0, 1).contiguous()
    inputs = {
        "pil": image,
        "str": str(path),
        "path": path,
        "bytes": path.read_bytes(),
        "file object": io.BytesIO(path.read_bytes()),
        "numpy hwc": hwc,
        "numpy chw (explicit)": hwc.transpose(2, 0, 1),
        "torch chw": chw_tensor,
        "torch hwc": torch.from_numpy(hwc),
        "numpy batch": hwc[None],
    }
    for processor in (pil_processor, torch_processor):
        expected = processor(image)["pixel_values"]
        for label, value in inputs.items():
            kwargs = {"input_data_format": "channels_first"} if label == "numpy chw (explicit)" else {}
            out = processor(value, **kwargs)
            assert torch.equal(out["pixel_values"], expected), (type(processor).__name__, label)
            assert out["image_sizes"].tolist() == [[211, 337]]


def test_url_input(monkeypatch, common, pil_processor):
    data = (common / "images" / "tiny_60x40.png").read_bytes()

    class Response(io.BytesIO):
        def __enter__(self):
            return self

        def __exit__(self, *args):
            self.close()

    seen = []
    monkeypatch.setattr("urllib.request.urlopen", lambda url, timeout: seen.append(url) or Response(data))
    out = pil_processor("https://example.com/tiny.png")
    assert seen == ["https://example.com/tiny.png"]
    assert torch.equal(out["pixel_values"], pil_processor(_rgb(common, "tiny_60x40.png"))["pixel_values"])


# ---------------------------------------------------------------------------------------------------------------
# Modes
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "1", "YCbCr"])
def test_modes_converted_like_convert_rgb(common, mode, pil_processor, torch_processor):
    base = _rgb(common, "odd_337x211.png")
    image = base.convert(mode)
    expected_rgb = image.convert("RGB")
    assert np.array_equal(np.asarray(convert_to_rgb(image)), np.asarray(expected_rgb))
    for processor in (pil_processor, torch_processor):
        assert torch.equal(processor(image)["pixel_values"], processor(expected_rgb)["pixel_values"]), mode


def test_rgba_drops_alpha_without_compositing(common, pil_processor):
    base = _rgb(common, "odd_337x211.png")
    rgba = base.copy()
    rgba.putalpha(Image.new("L", base.size, 0))  # fully transparent: colours are kept, not blended
    assert torch.equal(pil_processor(rgba)["pixel_values"], pil_processor(base)["pixel_values"])
    rgba_array = np.concatenate([np.asarray(base), np.zeros((*np.asarray(base).shape[:2], 1), np.uint8)], axis=2)
    assert torch.equal(pil_processor(rgba_array)["pixel_values"], pil_processor(base)["pixel_values"])


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_16_bit_images_scaled_not_clipped(common, mode, pil_processor):
    gray = _rgb(common, "odd_337x211.png").convert("L")
    v8 = np.asarray(gray)
    v16 = v8.astype(np.uint32) * 257  # the 8 -> 16 bit expansion
    if mode == "I":
        image = Image.fromarray(v16.astype(np.int32))
    elif mode == "I;16":
        image = Image.fromarray(v16.astype(np.uint16))
    else:  # big-endian 16 bit (Pillow's own convert to I;16B clips, so build it from bytes)
        image = Image.frombytes(mode, gray.size, v16.astype(">u2").tobytes())
    assert image.mode == mode
    assert np.array_equal(np.asarray(convert_to_rgb(image))[..., 0], v8)
    assert torch.equal(pil_processor(image)["pixel_values"], pil_processor(gray)["pixel_values"])
    # numpy uint16 arrays follow the same rule
    assert torch.equal(pil_processor(v16.astype(np.uint16))["pixel_values"], pil_processor(gray)["pixel_values"])


def test_16_bit_formula_on_every_value():
    values = np.arange(65536, dtype=np.uint32).reshape(256, 256)
    image = Image.fromarray(values.astype(np.uint16))
    assert image.mode == "I;16"
    converted = np.asarray(convert_to_rgb(image))
    assert np.array_equal(converted[..., 0], ((values + 128) // 257).astype(np.uint8))
    assert converted.max() == 255 and converted.min() == 0
    assert (converted[..., 0] == 255).sum() == 129  # 65407..65535: nothing clipped early


def test_out_of_range_and_float_modes_refused():
    with pytest.raises(ValueError, match="16-bit"):
        convert_to_rgb(Image.fromarray(np.full((4, 4), 70000, dtype=np.int32)))
    with pytest.raises(ValueError, match="mode 'F'"):
        SliMEImageProcessorPil()(Image.new("F", (8, 8)))


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("processor_class", [SliMEImageProcessorPil, SliMEImageProcessor])
def test_bad_inputs_raise_value_error(tmp_path, common, processor_class):
    processor = processor_class()
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes((common / "images" / "wide_1344x672.png").read_bytes()[:2000])
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not an image at all")
    cases = {
        "zero-area numpy": (np.zeros((0, 10, 3), np.uint8), "zero area"),
        "zero-area 2-D": (np.zeros((10, 0), np.uint8), "zero area"),
        "zero-area PIL": (Image.new("RGB", (0, 5)), "zero area"),
        "zero-area tensor": (torch.zeros(3, 0, 7, dtype=torch.uint8), "zero area"),
        "corrupt bytes": (b"\x89PNG\r\n\x1a\n garbage", "Cannot decode"),
        "garbage file": (str(garbage), "Cannot decode"),
        "truncated file": (truncated, "Cannot decode"),
        "missing file": (str(tmp_path / "missing.png"), "not a file"),
        "float array": (np.zeros((8, 8, 3), np.float32), "dtype"),
        "float tensor": (torch.zeros(3, 8, 8), "dtype"),
        "int64 array": (np.zeros((8, 8, 3), np.int64), "dtype"),
        "5 channels": (np.zeros((8, 8, 5), np.uint8), "channel"),
        "1-D array": (np.zeros(8, np.uint8), "dimensions"),
        "5-D array": (np.zeros((1, 1, 8, 8, 3), np.uint8), "dimensions"),
        "empty list": ([], "No images"),
        "empty nested": ([[], []], "No images"),
        "None": (None, "unsupported type"),
        "number": (3, "unsupported type"),
    }
    for label, (value, message) in cases.items():
        with pytest.raises(ValueError, match=message):
            processor(value)
        assert label


def test_decompression_bomb_refused(monkeypatch, tmp_path, common):
    processor = SliMEImageProcessorPil()
    path = common / "images" / "tiny_60x40.png"  # 2400 pixels
    for limit in (2000, 1000):  # over the limit (Pillow warns) and over twice the limit (Pillow raises)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        with pytest.raises(ValueError, match="MAX_IMAGE_PIXELS"):
            processor(str(path))
        with pytest.raises(ValueError, match="MAX_IMAGE_PIXELS"):
            processor(path.read_bytes())
        with pytest.raises(ValueError, match="MAX_IMAGE_PIXELS"):
            processor(np.zeros((40, 60, 3), np.uint8))
        with pytest.raises(ValueError, match="MAX_IMAGE_PIXELS"):
            SliMEImageProcessor()(Image.new("RGB", (60, 40)))
        with pytest.raises(ValueError, match="MAX_IMAGE_PIXELS"):
            load_image(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2400)
    assert processor(str(path))["pixel_values"].shape[1] == 3


def test_bad_options_raise_value_error(common):
    image = _rgb(common, "tiny_60x40.png")
    with pytest.raises(ValueError, match="square"):
        SliMEImageProcessorPil(crop_size={"height": 336, "width": 224})
    with pytest.raises(ValueError, match="crop_size"):
        SliMEImageProcessorPil(size={"height": 224, "width": 224})
    with pytest.raises(ValueError, match="num_threads"):
        SliMEImageProcessorPil(num_threads=0)
    with pytest.raises(ValueError, match="return_tensors"):
        SliMEImageProcessorPil()(image, return_tensors="tf")
    with pytest.raises(ValueError, match="image_mean"):
        SliMEImageProcessorPil()(image, image_mean=[0.5, 0.5])
    with pytest.raises(ValueError, match="RGB"):
        SliMEImageProcessorPil()(image, do_convert_rgb=False)
    with pytest.raises(ValueError, match="resample"):
        SliMEImageProcessor(resample=Image.Resampling.LANCZOS)


@pytest.mark.parametrize("num_threads", [1, 2])
def test_exact_for_any_rescale_factor(common, num_threads):
    """Where the fast in-place arithmetic would round differently, a lookup table keeps the recipe exact."""
    processor = SliMEImageProcessorPil(num_threads=num_threads)
    image = _rgb(common, "portrait_500x700.png")
    levels = processor(image, do_rescale=False, do_normalize=False)["pixel_values"][0].numpy()
    assert np.array_equal(levels, levels.astype(np.uint8))
    for factor in (0.003, 1 / 255):
        normalizer = _get_normalizer(True, factor, True, tuple(processor.image_mean), tuple(processor.image_std))
        assert normalizer.use_fast is (factor == 1 / 255)
        mean = np.asarray(processor.image_mean, dtype=np.float32)[:, None, None]
        std = np.asarray(processor.image_std, dtype=np.float32)[:, None, None]
        expected = ((levels.astype(np.uint8) * factor).astype(np.float32) - mean) / std
        out = processor(image, rescale_factor=factor)["pixel_values"][0].numpy()
        assert np.array_equal(out, expected), factor


def test_per_call_options(common):
    image = _rgb(common, "tiny_60x40.png")
    plain = SliMEImageProcessorPil()(image, do_normalize=False, do_rescale=False)["pixel_values"][0]
    assert plain.max() <= 255 and float(plain.max()) == float(plain.round().max())  # raw levels
    global_view = np.asarray(image.resize((336, 336))).transpose(2, 0, 1)
    assert torch.equal(plain[0], torch.from_numpy(global_view.astype(np.float32)))


# ---------------------------------------------------------------------------------------------------------------
# Saving, loading, Auto classes
# ---------------------------------------------------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path, common):
    processor = SliMEImageProcessorPil(num_threads=1, image_mean=[0.5, 0.5, 0.5])
    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert config["image_processor_type"] == "SliMEImageProcessorPil"
    assert config["auto_map"]["AutoImageProcessor"] == IMAGE_PROCESSOR_AUTO_MAP
    assert config["image_mean"] == [0.5, 0.5, 0.5] and config["num_threads"] == 1
    assert config["crop_size"] == {"height": 336, "width": 336}
    assert (tmp_path / "image_processing_slime.py").is_file()  # the remote-code file travels with the config
    reloaded = SliMEImageProcessorPil.from_pretrained(tmp_path)
    assert reloaded.to_dict() == processor.to_dict()
    image = _rgb(common, "tiny_60x40.png")
    assert torch.equal(reloaded(image)["pixel_values"], processor(image)["pixel_values"])
    as_torch = SliMEImageProcessor.from_pretrained(tmp_path)  # one configuration serves both backends
    assert tuple(as_torch.image_mean) == (0.5, 0.5, 0.5)
    torch_dir = tmp_path / "torch"
    as_torch.save_pretrained(torch_dir)
    assert json.loads((torch_dir / "preprocessor_config.json").read_text())["image_processor_type"] == (
        "SliMEImageProcessor"
    )


def test_loads_the_original_clip_preprocessor_config(common, golden_images):
    """The released checkpoints carry CLIP's preprocessor_config.json (size 336, crop_size 336): same pixels."""
    processor = SliMEImageProcessorPil.from_pretrained(common / "clip_preprocessor_config.json")
    out = processor(str(common / "images" / "wide_1344x672.png"))
    assert sha256_f32(out["pixel_values"][0].numpy()) == golden_images["wide_1344x672.png"]["sha256_float32"]
    assert SliMEImageProcessorPil(size={"shortest_edge": 336}).size.shortest_edge == 336


@pytest.fixture
def torchvision_reported_available(monkeypatch):
    from transformers.models.auto import image_processing_auto

    monkeypatch.setattr(image_processing_auto, "is_torchvision_available", lambda: True)
    return image_processing_auto


def _slime_config_class():
    from slime_hf.configuration_slime import SliMEConfig

    return SliMEConfig


def _auto_image_processor_usable() -> bool:
    """transformers releases before the backend refactor expose AutoImageProcessor only with torchvision."""
    try:
        from transformers import AutoImageProcessor

        AutoImageProcessor.register  # noqa: B018 - the attribute access raises where it is a torchvision stub
        return True
    except ImportError:
        return False


needs_auto_image_processor = pytest.mark.skipif(
    not _auto_image_processor_usable(),
    reason="this transformers version offers AutoImageProcessor only with torchvision installed",
)


@needs_auto_image_processor
@pytest.mark.parametrize("saved_class", [SliMEImageProcessorPil, SliMEImageProcessor])
def test_auto_image_processor_defaults_to_pil(tmp_path, saved_class, torchvision_reported_available):
    from transformers import AutoImageProcessor

    register_image_processors(_slime_config_class())
    saved_class().save_pretrained(tmp_path)
    assert torchvision_reported_available.is_torchvision_available()
    assert type(AutoImageProcessor.from_pretrained(tmp_path)) is SliMEImageProcessorPil
    assert type(AutoImageProcessor.from_pretrained(tmp_path, backend="pil")) is SliMEImageProcessorPil
    assert type(AutoImageProcessor.from_pretrained(tmp_path, backend="torch")) is SliMEImageProcessor
    # The PIL default does not depend on the DEFAULT_TO_PIL list: the "torchvision" request falls back to "pil".
    defaults = torchvision_reported_available.DEFAULT_TO_PIL_BACKEND_IMAGE_PROCESSORS
    saved = list(defaults)
    try:
        defaults[:] = [name for name in defaults if not name.startswith("SliME")]
        assert type(AutoImageProcessor.from_pretrained(tmp_path)) is SliMEImageProcessorPil
    finally:
        defaults[:] = saved


@needs_auto_image_processor
@pytest.mark.slow
def test_auto_image_processor_remote_code_defaults_to_pil(tmp_path, common):
    """A fresh process that never imports slime_hf loads the copied file with trust_remote_code=True."""
    model_dir = tmp_path / "model"
    SliMEImageProcessorPil().save_pretrained(model_dir)
    script = textwrap.dedent(
        """
        import sys
        import torch
        from transformers.models.auto import image_processing_auto
        image_processing_auto.is_torchvision_available = lambda: True
        from transformers import AutoImageProcessor

        folder, image = sys.argv[1], sys.argv[2]
        default = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
        fast = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True, backend="torch")
        out = default(image)
        assert "slime_hf" not in sys.modules
        print(type(default).__name__, type(default).__module__.split(".")[0], type(fast).__name__,
              tuple(out["pixel_values"].shape), out["image_sizes"].tolist())
        """
    )
    env = python_env(with_package=False, modules_cache=tmp_path / "modules")
    image = common / "images" / "wide_1344x672.png"
    result = run_python("-c", script, str(model_dir), str(image), cwd=tmp_path, env=env, timeout=120)
    assert result.stdout.split("\n")[-2] == (
        "SliMEImageProcessorPil transformers_modules SliMEImageProcessor (1, 7, 3, 336, 336) [[672, 1344]]"
    )
