"""Speed of the SliME image processors against the original pipeline, on CPU.

Compares, in one process, with the same torch thread setting and alternating runs:

  (a) the original pipeline re-created under the installed transformers: PIL geometry (grid, resize + black
      canvas, 336x336 tiles, global resize) then `CLIPImageProcessor` once per view and `torch.stack`;
  (b) `SliMEImageProcessorPil` on one thread;
  (c) `SliMEImageProcessorPil` with its two resizes on two threads;
  (d) `SliMEImageProcessor` (torch backend).

Images are already decoded RGB PIL images (decoding is not timed). Usage:

    python examples/benchmarks/benchmark_processor.py [--fixtures tests/fixtures/reference] [--runs 30]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image


ROOT = Path(__file__).resolve().parents[2]
try:
    import slime_hf  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

from slime_hf.image_processing_slime import (  # noqa: E402
    SliMEImageProcessor,
    SliMEImageProcessorPil,
    get_slice_geometry,
)


IMAGES = ("wide_1344x672.png", "banner_3000x250.png")


def sha256_f32(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array, "<f4").tobytes()).hexdigest()


def make_original(clip_config: Path):
    """The original `process_anyres_image`: PIL geometry, then the CLIP processor once per view."""
    from transformers import CLIPImageProcessor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clip = CLIPImageProcessor.from_pretrained(str(clip_config))
    tile = 336

    def process(image: Image.Image) -> torch.Tensor:
        geometry = get_slice_geometry((image.height, image.width))
        canvas_h, canvas_w = geometry.canvas_size
        new_h, new_w = geometry.resized_size
        top, left = geometry.paste_offset
        resized = image.resize((new_w, new_h))
        canvas = Image.new("RGB", (canvas_w, canvas_h), (0, 0, 0))
        canvas.paste(resized, (left, top))
        crops = [
            canvas.crop((x, y, x + tile, y + tile)) for y in range(0, canvas_h, tile) for x in range(0, canvas_w, tile)
        ]
        views = [image.resize((tile, tile))] + crops
        return torch.stack([clip.preprocess(view, return_tensors="pt")["pixel_values"][0] for view in views])

    return process, type(clip).__name__


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixtures", type=Path, default=ROOT / "tests" / "fixtures" / "reference")
    parser.add_argument("--runs", type=int, default=30, help="timed runs per method and image (after 2 warm-ups)")
    parser.add_argument("--torch-threads", type=int, default=1)
    args = parser.parse_args()

    torch.set_num_threads(args.torch_threads)
    common = args.fixtures / "common"
    goldens = {entry["file"]: entry for entry in json.loads((common / "processor_goldens.json").read_text())["images"]}
    original, clip_class = make_original(common / "clip_preprocessor_config.json")
    pil_1 = SliMEImageProcessorPil(num_threads=1)
    pil_2 = SliMEImageProcessorPil(num_threads=2)
    fast = SliMEImageProcessor()
    methods = {
        "(a) original (PIL + CLIP per view)": lambda image: original(image),
        "(b) SliMEImageProcessorPil, 1 thread": lambda image: pil_1(image)["pixel_values"],
        "(c) SliMEImageProcessorPil, 2 threads": lambda image: pil_2(image)["pixel_values"],
        "(d) SliMEImageProcessor (torch)": lambda image: fast(image)["pixel_values"],
    }

    print(f"torch {torch.__version__}, torch threads {torch.get_num_threads()}, baseline CLIP class {clip_class}")
    rows = []
    for name in IMAGES:
        with Image.open(common / "images" / name) as file:
            image = file.convert("RGB")
        golden = goldens[name]["sha256_float32"]
        reference = original(image).numpy()
        assert sha256_f32(reference) == golden, f"baseline output differs from the golden for {name}"
        for label in ("(b)", "(c)"):
            method = next(m for key, m in methods.items() if key.startswith(label))
            assert sha256_f32(method(image)[0].numpy()) == golden, f"{label} output differs from the golden"
        torch_diff = float(np.abs(methods["(d) SliMEImageProcessor (torch)"](image)[0].numpy() - reference).max())

        times: dict[str, list[float]] = {key: [] for key in methods}
        keys = list(methods)
        for run in range(args.runs + 2):
            order = keys[run % len(keys) :] + keys[: run % len(keys)]  # rotate so no method always runs first
            for key in order:
                start = time.perf_counter()
                methods[key](image)
                elapsed = time.perf_counter() - start
                if run >= 2:
                    times[key].append(elapsed)
        base, base_best = statistics.median(times[keys[0]]), min(times[keys[0]])
        views = get_slice_geometry((image.height, image.width)).num_views
        for key in keys:
            median, best = statistics.median(times[key]), min(times[key])
            rows.append((name, views, key, median * 1e3, 1.0 / median, base / median, best * 1e3, base_best / best))
        rows.append((name, views, "torch backend max |diff| vs original", torch_diff) + (math.nan,) * 4)

    print(
        f"\n{'image':<22}{'views':>6}  {'method':<40}{'ms/image':>10}{'images/s':>10}{'speed-up':>10}"
        f"{'best ms':>10}{'best x':>9}"
    )
    for name, views, key, ms, per_s, ratio, best_ms, best_ratio in rows:
        if math.isnan(per_s):
            print(f"{name:<22}{views:>6}  {key:<40}{ms:>10.4f}")
        else:
            print(
                f"{name:<22}{views:>6}  {key:<40}{ms:>10.2f}{per_s:>10.1f}{ratio:>9.2f}x{best_ms:>10.2f}"
                f"{best_ratio:>8.2f}x"
            )
    print(
        f"\nms/image, images/s, speed-up: medians of {args.runs} alternating runs; best: fastest run (speed-up of "
        "the fastest runs). (b) and (c) outputs are bit-identical to the goldens (sha256 checked). Another process "
        "on the machine slows (a) and (c) most: compare runs taken on an idle machine."
    )

    print_kept_index_changes(args.fixtures)


def print_kept_index_changes(fixtures: Path) -> None:
    """How many router-kept local tokens change when the golden cases run on the torch backend's pixels."""
    import json

    from slime_hf import SliMEForConditionalGeneration, SliMEImageProcessor

    fast = SliMEImageProcessor()
    print(f"\n{'variant':<8}{'case':<16}{'image':>6}{'kept (golden)':>15}{'kept (torch pixels)':>21}{'changed':>9}")
    for variant in ("V", "L"):
        model = SliMEForConditionalGeneration.from_pretrained(fixtures / variant / "checkpoint").eval()
        cases = json.loads((fixtures / variant / "model_goldens" / "cases.json").read_text())["cases"]
        for case in cases:
            if not case["images"] or case["name"] == "batched_left_pad":
                continue
            inputs = fast([Image.open(fixtures / f) for f in case["image_files"]])
            ids = case["input_ids"]
            ids = torch.tensor(json.loads(ids) if isinstance(ids, str) else ids)
            ids[ids == -200] = model.config.image_token_id
            with torch.no_grad():
                kept = model.get_image_features(
                    inputs["pixel_values"], inputs["image_sizes"], ids, router_top_p=case["top_p"]
                ).selected_indices
            for index, image in enumerate(case["images"]):
                golden = image["selected_indices"]
                golden = set(json.loads(golden) if isinstance(golden, str) else golden)
                ours = set(kept[index].tolist())
                print(
                    f"{variant:<8}{case['name']:<16}{index:>6}{len(golden):>15}{len(ours):>21}{len(golden ^ ours):>9}"
                )


if __name__ == "__main__":
    main()
