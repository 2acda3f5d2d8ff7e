"""What each SliME component produces for one image, printed step by step and drawn as a PNG figure.

    python examples/walkthrough.py --image photo.png --prompt "What is shown?" --output walkthrough.png

Steps: slicing (grid, canvas, views), vision tower, global adapter (576 tokens and the gate between its MLP and
attention experts), local compressor (144 tokens per crop, merged into one raster), router (scores, kept tokens),
token budget, answer. The figure shows the padded canvas with the slicing grid and the kept local tokens outlined
(dropped ones veiled), the global view with the gate per token, and the router scores over the local raster.
Without `--model` it runs the untrained demonstration model: the slicing is real, the gate and the router's
choices come from random weights.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from _common import (
    add_model_arguments,
    check_image_files,
    check_placeholders,
    demo_image,
    load_model,
    run_cli,
    user_content,
)


@dataclass
class Walkthrough:
    """Everything the figure and the printout show, for one image."""

    image_path: str
    image_size: tuple[int, int]  # (height, width) of the original image
    grid: tuple[int, int]  # (rows, cols) of local crops
    tile: int  # side of one crop in pixels
    canvas_size: tuple[int, int]
    resized_size: tuple[int, int]
    paste_offset: tuple[int, int]  # (top, left)
    canvas: np.ndarray  # (H, W, 3) uint8, rebuilt from the crops the model saw
    global_view: np.ndarray  # (tile, tile, 3) uint8
    pixel_values_shape: tuple[int, ...]
    vision_shape: tuple[int, ...]
    gates: np.ndarray  # (576, 2): weight of the MLP and the attention expert per global token
    global_shape: tuple[int, ...]
    local_side: int  # local tokens per crop side (12)
    local_shape: tuple[int, ...]
    scores: np.ndarray  # (rows * local_side * cols * local_side,) router score per merged local token
    kept: np.ndarray  # kept positions in the merged raster, ascending
    top_p: float
    budget: dict
    text_tokens: int
    answer: str | None = None
    label: str | None = None
    lines: list[str] = field(default_factory=list)

    @property
    def raster(self) -> tuple[int, int]:
        """(rows, cols) of the merged local token raster."""
        return self.grid[0] * self.local_side, self.grid[1] * self.local_side

    @property
    def token_pixels(self) -> int:
        """Side of one local token's cell on the canvas (336 / 12 = 28 px)."""
        return self.tile // self.local_side

    def token_cells(self, indices: np.ndarray) -> np.ndarray:
        """(x, y) of the top-left canvas pixel of merged local tokens: t = row * raster_cols + col."""
        cols = self.raster[1]
        return np.stack([indices % cols, indices // cols], axis=-1) * self.token_pixels


def _to_uint8(views, mean, std) -> np.ndarray:
    """Normalised (N, 3, h, w) views back to (N, h, w, 3) uint8 pixels."""
    import torch

    mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    pixels = (views.float().cpu() * std + mean).mul(255).round().clamp(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).numpy()


def walk(
    model, processor, image_path: str, prompt: str, router_top_p: float | None = None, max_new_tokens: int = 0
) -> Walkthrough:
    """Runs one image through each SliME stage and records what comes out."""
    import torch
    from PIL import Image

    from slime_hf.image_processing_slime import get_slice_geometry

    image = Image.open(image_path)
    geometry = get_slice_geometry((image.height, image.width))
    rows, cols = geometry.grid
    text = processor.apply_chat_template(
        [{"role": "user", "content": user_content(prompt)}], add_generation_prompt=True
    )
    inputs = processor(images=[image], text=text).to(model.device)
    pixel_values = inputs["pixel_values"]
    num_crops = rows * cols
    inner = model.model
    top_p = model.config.router_top_p if router_top_p is None else router_top_p

    with torch.no_grad():
        vision = inner.encode_views(pixel_values[0, : 1 + num_crops])
        adapter_dtype = inner.projector.linear_1.weight.dtype
        gates = inner.global_adapter.gates(vision[0].to(adapter_dtype))
        features = model.get_image_features(
            pixel_values, inputs["image_sizes"], inputs["input_ids"], inputs["attention_mask"], router_top_p=top_p
        )
        answer = None
        if max_new_tokens > 0:
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, router_top_p=top_p)
            answer = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]

    ip = processor.image_processor
    views = _to_uint8(pixel_values[0, : 1 + num_crops], ip.image_mean, ip.image_std)
    tile = views.shape[1]
    # The crops are row-major tiles of the padded canvas: put them back side by side.
    canvas = views[1:].reshape(rows, cols, tile, tile, 3).transpose(0, 2, 1, 3, 4).reshape(rows * tile, cols * tile, 3)
    local_tokens = features.local_tokens[0]
    return Walkthrough(
        image_path=str(image_path),
        image_size=(image.height, image.width),
        grid=(rows, cols),
        tile=tile,
        canvas_size=geometry.canvas_size,
        resized_size=geometry.resized_size,
        paste_offset=geometry.paste_offset,
        canvas=canvas,
        global_view=views[0],
        pixel_values_shape=tuple(pixel_values.shape),
        vision_shape=tuple(vision.shape),
        gates=gates.float().cpu().numpy(),
        global_shape=tuple(features.global_tokens[0].shape),
        local_side=inner.local_compressor.grid_size,
        local_shape=tuple(local_tokens.shape),
        scores=features.router_scores[0].float().cpu().numpy(),
        kept=features.selected_indices[0].cpu().numpy(),
        top_p=float(top_p),
        budget=features.image_token_budget[0],
        text_tokens=int(inputs["attention_mask"].sum()) - 1,  # the one image token is replaced by the block
        answer=answer,
        label=getattr(model.config, "demo_model_label", None),
    )


def describe(report: Walkthrough) -> list[str]:
    """The printout: one numbered line (or two) per stage."""
    (height, width), (rows, cols) = report.image_size, report.grid
    (canvas_h, canvas_w), (resized_h, resized_w) = report.canvas_size, report.resized_size
    top, left = report.paste_offset
    raster_rows, raster_cols = report.raster
    budget, kept, total = report.budget, len(report.kept), report.scores.size
    gate_mlp, gate_attention = report.gates.mean(0)
    per_crop = np.bincount(
        (report.kept // report.raster[1] // report.local_side) * cols
        + (report.kept % report.raster[1]) // report.local_side,
        minlength=rows * cols,
    )
    lines = [
        f"image: {report.image_path} ({width}x{height})",
        f"1. slicing: grid {rows} x {cols} (rows x columns) = {rows * cols} local crops of {report.tile}x{report.tile};"
        f" the image is resized to {resized_w}x{resized_h} and pasted at (left {left}, top {top}) on a black "
        f"{canvas_w}x{canvas_h} canvas",
        f"   views: pixel_values {report.pixel_values_shape} = 1 global view (whole image resized to "
        f"{report.tile}x{report.tile}) + {rows * cols} crops",
        f"2. vision tower: patch features {report.vision_shape} (views, patches, width)",
        f"3. global adapter: {report.global_shape[0]} tokens of width {report.global_shape[1]}; gate per token "
        f"(mean): MLP expert {gate_mlp:.3f}, attention expert {gate_attention:.3f} "
        f"(attention share {report.gates[:, 1].min():.3f} .. {report.gates[:, 1].max():.3f})",
        f"4. local compressor: {rows * cols} crops x {report.local_side**2} tokens = {report.local_shape[0]} tokens "
        f"of width {report.local_shape[1]}, merged into a {raster_rows} x {raster_cols} raster",
        f"5. router (top-p {report.top_p:g}): scores {report.scores.min():.3f} .. {report.scores.max():.3f}; keeps "
        f"{kept} of {total} local tokens ({100 * kept / total:.1f}%); per crop: "
        + ", ".join(f"{count}" for count in per_crop.tolist()),
        f"6. token budget: global {budget['global']} + separator {budget['separator']} + local kept "
        f"{budget['local_kept']} = {budget['total']} of {budget['global'] + budget['separator'] + total} image "
        f"tokens; the language model reads {budget['total']} + {report.text_tokens} text tokens",
    ]
    if report.answer is not None:
        lines.append(f"7. answer: {report.answer.strip()}")
    return lines


def build_figure(report: Walkthrough):
    """The figure: canvas with slicing grid and kept tokens (left), global view with the gate and router scores
    (right). Artists carry gids (`crop-grid`, `kept-tokens`, `dropped-tokens`) so that their geometry can be
    checked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.collections import PatchCollection
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    (rows, cols), tile, cell = report.grid, report.tile, report.token_pixels
    canvas_h, canvas_w = report.canvas.shape[:2]
    figure = Figure(figsize=(11.5, 5.6), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(2, 2, width_ratios=(2.1, 1))

    ax = figure.add_subplot(grid[:, 0])
    ax.imshow(report.canvas, extent=(0, canvas_w, canvas_h, 0), interpolation="nearest")
    all_tokens = np.arange(report.scores.size)
    dropped = np.setdiff1d(all_tokens, report.kept)
    ax.add_collection(
        PatchCollection(
            [Rectangle(tuple(xy), cell, cell) for xy in report.token_cells(dropped)],
            facecolor="black",
            edgecolor="none",
            alpha=0.6,
            gid="dropped-tokens",
        )
    )
    ax.add_collection(
        PatchCollection(
            [Rectangle(tuple(xy), cell, cell) for xy in report.token_cells(report.kept)],
            facecolor="none",
            edgecolor="#ffd400",
            linewidth=0.5,
            gid="kept-tokens",
        )
    )
    for x in range(0, canvas_w + 1, tile):
        ax.plot([x, x], [0, canvas_h], color="white", linewidth=2.5, gid="crop-grid")
    for y in range(0, canvas_h + 1, tile):
        ax.plot([0, canvas_w], [y, y], color="white", linewidth=2.5, gid="crop-grid")
    for k in range(rows * cols):
        r, c = divmod(k, cols)
        ax.text(
            c * tile + 8,
            r * tile + 8,
            f"crop {k}",
            color="white",
            fontsize=9,
            va="top",
            bbox={"facecolor": "black", "alpha": 0.6, "edgecolor": "none", "pad": 1.5},
        )
    ax.set_xlim(0, canvas_w)
    ax.set_ylim(canvas_h, 0)
    ax.set_xticks(range(0, canvas_w + 1, tile))
    ax.set_yticks(range(0, canvas_h + 1, tile))
    budget = report.budget
    ax.set_title(
        f"{rows} x {cols} crops of {tile} px on the padded {canvas_w}x{canvas_h} canvas\nlocal tokens "
        f"({cell} px cells): {budget['local_kept']} of {report.scores.size} kept (outlined, router top-p "
        f"{report.top_p:g}), the others dropped (dark)",
        fontsize=9,
    )

    ax = figure.add_subplot(grid[0, 1])
    ax.imshow(report.global_view, extent=(0, tile, tile, 0))
    side = int(round(report.gates.shape[0] ** 0.5))
    shown = ax.imshow(
        report.gates[:, 1].reshape(side, side),
        extent=(0, tile, tile, 0),
        cmap="magma",
        alpha=0.55,
        interpolation="nearest",
    )
    figure.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
    ax.set_axis_off()
    ax.set_title(
        f"global view: {budget['global']} adapter tokens;\nattention-expert gate per token "
        f"(mean {report.gates[:, 1].mean():.2f})",
        fontsize=9,
    )

    ax = figure.add_subplot(grid[1, 1])
    raster_rows, raster_cols = report.raster
    scores = np.ma.masked_array(report.scores, mask=np.isin(all_tokens, report.kept, invert=True))
    shown = ax.imshow(
        scores.reshape(raster_rows, raster_cols),
        cmap="viridis",
        interpolation="nearest",
        extent=(0, raster_cols, raster_rows, 0),
    )
    ax.set_facecolor("#404040")
    figure.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
    for x in range(report.local_side, raster_cols, report.local_side):
        ax.axvline(x, color="white", linewidth=1)
    for y in range(report.local_side, raster_rows, report.local_side):
        ax.axhline(y, color="white", linewidth=1)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"router scores of the {raster_rows} x {raster_cols} local tokens (dropped: gray)", fontsize=9)

    title = (
        f"SliME on {Path(report.image_path).name}: global {budget['global']} + separator {budget['separator']}"
        f" + local {budget['local_kept']} = {budget['total']} image tokens"
    )
    if report.label:
        title += "\nuntrained demonstration model: slicing is real, gate and router choices come from random weights"
    figure.suptitle(title, fontsize=11)
    return figure


def run(args: argparse.Namespace) -> Walkthrough:
    """Loads the model, walks the image through it, prints each stage and saves the figure."""
    model, processor = load_model(args)
    report = walk(model, processor, args.image, args.prompt, args.router_top_p, args.max_new_tokens)
    report.lines = describe(report)
    print("\n".join(report.lines))
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    build_figure(report).savefig(output, dpi=args.dpi)
    print(f"figure: {output}")
    return report


def check(args: argparse.Namespace) -> None:
    check_image_files([args.image])
    check_placeholders(args.prompt, 1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default=str(demo_image()), help="the image (default: the shipped demo image)")
    parser.add_argument(
        "--prompt",
        default="What is shown in this image?",
        help="the question the router compares the local tokens with",
    )
    parser.add_argument("--output", default="walkthrough.png", help="where the PNG figure goes")
    parser.add_argument("--dpi", type=int, default=100)
    add_model_arguments(parser, max_new_tokens=12)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, build_parser(), argv, check=check)


if __name__ == "__main__":
    sys.exit(main())
