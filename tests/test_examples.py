"""The example scripts run against the demo model, the `image-text-to-text` pipeline works natively and through remote
code, and the walkthrough figure draws the slicing grid and the kept tokens where the model has them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import golden_utils as gu
from conftest import FIXTURES, PROJECT_ROOT
from helpers import run_hidden
from slime_hf import SliMEForConditionalGeneration, SliMEProcessor
from slime_hf.demo import DEMO_IMAGE, build_demo_model
from slime_hf.image_processing_slime import get_slice_geometry, get_slice_grid


EXAMPLES = PROJECT_ROOT / "examples"
QUESTION = "What is shown in this image?"


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory) -> Path:
    return build_demo_model(tmp_path_factory.mktemp("demo") / "model")


@pytest.fixture(scope="module")
def demo(demo_folder):
    model = SliMEForConditionalGeneration.from_pretrained(demo_folder, dtype=torch.float32).eval()
    return model, SliMEProcessor.from_pretrained(demo_folder)


@pytest.fixture(scope="module")
def golden_folder(tmp_path_factory) -> Path:
    """The V fixture checkpoint saved as a self-contained folder (package weights, remote code, processor)."""
    checkpoint = gu.checkpoint_dir("V")
    folder = tmp_path_factory.mktemp("golden") / "saved"
    SliMEForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).save_pretrained(folder)
    SliMEProcessor.from_pretrained(checkpoint).save_pretrained(folder)
    return folder


def run_example(script: str, *args: str, cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        cwd=cwd,
        input=stdin,
        text=True,
        capture_output=True,
        timeout=600,
    )


def greedy_answers(demo, messages_per_sample: list[list[dict]], images: list, max_new_tokens: int, **kwargs) -> list:
    """What the scripts must reproduce: the chat template, the processor and greedy `generate`, called directly."""
    model, processor = demo
    prompts = [processor.apply_chat_template(messages, add_generation_prompt=True) for messages in messages_per_sample]
    inputs = processor(images=images, text=prompts)
    out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens, **kwargs)
    return [a.strip() for a in processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)]


def user_turn(text: str, image=True) -> dict:
    return {"role": "user", "content": ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]}


def test_every_example_script_has_a_test():
    tested = {"generate.py", "chat.py", "pipeline.py", "walkthrough.py"}
    assert {path.name for path in EXAMPLES.glob("*.py") if not path.name.startswith("_")} == tested


def test_examples_offer_the_demo_dtypes():
    from slime_hf.demo import DTYPES

    sys.path.insert(0, str(EXAMPLES))
    try:
        import _common
    finally:
        sys.path.remove(str(EXAMPLES))
    assert _common.DTYPES == DTYPES


def test_generate_answers_a_folder_in_batches_as_jsonl(demo_folder, demo, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    image = Image.open(DEMO_IMAGE).convert("RGB")
    images = {"a.png": image, "b.jpg": image.rotate(90, expand=True), "c.png": image.resize((300, 200))}
    for name, picture in images.items():
        picture.save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    prompt = "Describe the image."
    result = run_example(
        "generate.py",
        "--model",
        str(demo_folder),
        "--images",
        str(folder),
        "--prompt",
        prompt,
        "--batch-size",
        "2",
        "--max-new-tokens",
        "6",
        "--output",
        "out/answers.jsonl",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "3/3" in result.stderr  # the progress bar
    records = [json.loads(line) for line in (tmp_path / "out" / "answers.jsonl").read_text().splitlines()]
    # Grouped by number of crops (c: 2; a and b: 6, in their folder order), then in batches of 2.
    assert [Path(r["image"]).name for r in records] == ["c.png", "a.png", "b.jpg"]
    for record in records:
        picture = Image.open(record["image"])
        rows, cols = get_slice_grid((picture.height, picture.width))
        assert record["prompt"] == prompt and record["grid"] == [rows, cols]
        budget = record["image_tokens"]
        assert budget["local_total"] == 144 * rows * cols and 0 < budget["local_kept"] <= budget["local_total"]
        assert budget["total"] == 576 + 1 + budget["local_kept"]
    # Batch 1 holds c and a (left padded together), batch 2 holds b alone.
    files = [str(folder / name) for name in ("c.png", "a.png", "b.jpg")]
    assert [r["answer"] for r in records[:2]] == greedy_answers(demo, [[user_turn(prompt)]] * 2, files[:2], 6)
    assert records[2]["answer"] == greedy_answers(demo, [[user_turn(prompt)]], files[2:], 6)[0]


def _load_generate_example():
    sys.path.insert(0, str(EXAMPLES))
    try:
        import generate
    finally:
        sys.path.remove(str(EXAMPLES))
    return generate


def _one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    return errors[0]


def test_generate_never_loses_an_existing_output(demo_folder, tmp_path, capsys):
    """An existing output is refused without --resume / --overwrite (before the model loads), and a run that fails on
    its first image leaves it byte for byte, --overwrite included."""
    generate = _load_generate_example()
    output = tmp_path / "answers.jsonl"
    previous = b'{"image": "old.png", "prompt": "p", "answer": "kept"}\n'
    output.write_bytes(previous)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not a png")
    model = ["--model", str(demo_folder), "--max-new-tokens", "2", "--output", str(output)]

    assert generate.main(model + ["--images", str(DEMO_IMAGE)]) == 2
    error = _one_error_line(capsys.readouterr().err)
    assert f"output file already exists: {output}" in error and "--resume" in error and "--overwrite" in error
    assert output.read_bytes() == previous

    # Used to leave answers.jsonl at 0 bytes: the file was opened for writing before the first image was read.
    assert generate.main(model + ["--images", str(corrupt), str(DEMO_IMAGE), "--overwrite"]) == 2
    assert "corrupt.png" in _one_error_line(capsys.readouterr().err)
    assert output.read_bytes() == previous
    # A new output is not created by a run that answers nothing.
    fresh = tmp_path / "new" / "answers.jsonl"
    assert generate.main(model[:-1] + [str(fresh), "--images", str(corrupt)]) == 2
    capsys.readouterr()
    assert not fresh.exists()

    with pytest.raises(SystemExit) as exit_info:  # argparse: one or the other
        generate.main(model + ["--resume", "--overwrite"])
    assert exit_info.value.code == 2 and "not allowed with argument" in capsys.readouterr().err

    assert generate.main(model + ["--images", str(DEMO_IMAGE), "--overwrite"]) == 0
    capsys.readouterr()
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["image"] for r in records] == [str(DEMO_IMAGE)]


def test_generate_resume_skips_answered_images_and_appends(demo_folder, tmp_path, capsys):
    generate = _load_generate_example()
    folder = tmp_path / "images"
    folder.mkdir()
    image = Image.open(DEMO_IMAGE).convert("RGB")
    image.save(folder / "a.png")
    image.resize((300, 200)).save(folder / "b.png")
    output = tmp_path / "answers.jsonl"
    common = ["--model", str(demo_folder), "--max-new-tokens", "3", "--batch-size", "2", "--output", str(output)]
    assert generate.main(common + ["--images", str(folder / "a.png")]) == 0
    capsys.readouterr()
    first = output.read_bytes()
    assert first.count(b"\n") == 1

    # A later run over the folder answers b only and appends it; a's line is untouched.
    assert generate.main(common + ["--images", str(folder), "--resume"]) == 0
    assert "1 image(s) already answered" in capsys.readouterr().err
    data = output.read_bytes()
    assert data.startswith(first)
    records = [json.loads(line) for line in data.decode().splitlines()]
    assert [Path(r["image"]).name for r in records] == ["a.png", "b.png"]

    # Nothing left to do: the file stays as it is (and the model is not even loaded).
    assert generate.main(common + ["--images", str(folder), "--resume", "--model", str(tmp_path / "no-model")]) == 0
    assert "all 2 image(s) already answered" in capsys.readouterr().err
    assert output.read_bytes() == data

    # A run stopped in the middle of a line: that line is redone, the complete ones are kept.
    output.write_bytes(data[: len(first) + 10])
    assert generate.main(common + ["--images", str(folder), "--resume"]) == 0
    assert "cut off the unfinished last line" in capsys.readouterr().err
    assert output.read_bytes() == data

    # Another prompt, or a line that is not a record: refused, the file untouched.
    assert generate.main(common + ["--images", str(folder), "--resume", "--prompt", "Another question?"]) == 2
    assert "another prompt" in _one_error_line(capsys.readouterr().err)
    output.write_bytes(b"garbage\n" + data)
    assert generate.main(common + ["--images", str(folder), "--resume"]) == 2
    assert "line 1" in _one_error_line(capsys.readouterr().err)
    assert output.read_bytes() == b"garbage\n" + data


def test_chat_streams_a_multi_turn_conversation_from_stdin(demo_folder, demo, tmp_path):
    turns = "What is shown?\n\n<image> and <image>?\nAnd the colours?\n/quit\nnever read\n"
    result = run_example(
        "chat.py",
        "--model",
        str(demo_folder),
        "--max-new-tokens",
        "5",
        "--transcript",
        "chat.json",
        cwd=tmp_path,
        stdin=turns,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "UNTRAINED DEMONSTRATION MODEL" in result.stderr
    assert "error: " in result.stderr and "placeholder" in result.stderr  # the "<image>" turn is refused, chat goes on
    messages = json.loads((tmp_path / "chat.json").read_text())
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[0]["content"][0] == {"type": "image", "image": str(DEMO_IMAGE)}
    assert result.stdout.count("assistant: ") == 2 and "never read" not in result.stdout
    first = greedy_answers(demo, [[user_turn("What is shown?")]], [str(DEMO_IMAGE)], 5)[0]
    history = [
        user_turn("What is shown?"),
        {"role": "assistant", "content": [{"type": "text", "text": first}]},
        user_turn("And the colours?", image=False),
    ]
    second = greedy_answers(demo, [history], [str(DEMO_IMAGE)], 5)[0]
    assert [messages[1]["content"][0]["text"], messages[3]["content"][0]["text"]] == [first, second]
    assert f"assistant: {first}" in result.stdout


def test_pipeline_example_answers_through_the_pipeline(demo_folder, demo, tmp_path):
    result = run_example(
        "pipeline.py", "--model", str(demo_folder), "--max-new-tokens", "6", "--router-top-p", "0.5", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    expected = greedy_answers(demo, [[user_turn(QUESTION)]], [str(DEMO_IMAGE)], 6, router_top_p=0.5)[0]
    assert result.stdout.strip().splitlines()[-1].strip() == expected


def _pipeline_answers(pipe, image_path: str, prompt_text: str, generate_kwargs: dict) -> dict:
    """The pipeline's answer to one question in each input form: chat with a PIL image, a path, a `url` item, and
    `images=` with a rendered prompt."""
    image = Image.open(image_path)

    def call(**inputs) -> list:
        # A fresh generate_kwargs per call: transformers 5.17 writes max_new_tokens into the caller's dict.
        return pipe(**inputs, max_new_tokens=6, generate_kwargs=dict(generate_kwargs))

    forms = {"pil": {"image": image}, "path": {"image": image_path}, "url": {"url": image_path}}
    answers = {}
    for name, item in forms.items():
        messages = [{"role": "user", "content": [{"type": "image", **item}, {"type": "text", "text": QUESTION}]}]
        out = call(text=messages)[0]["generated_text"]
        assert out[:-1] == messages and out[-1]["role"] == "assistant"
        answers[name] = out[-1]["content"].strip()
    out = call(images=[image], text=prompt_text, return_full_text=False)
    answers["images_text"] = out[0]["generated_text"].strip()
    return answers


def test_pipeline_natively_after_import(demo_folder, demo):
    from transformers import pipeline

    pipe = pipeline("image-text-to-text", model=str(demo_folder))
    assert type(pipe.model) is SliMEForConditionalGeneration and type(pipe.processor) is SliMEProcessor
    processor = demo[1]
    prompt = processor.apply_chat_template([user_turn(QUESTION)], add_generation_prompt=True)
    for top_p in (None, 0.5):
        extra = {} if top_p is None else {"router_top_p": top_p}
        answers = _pipeline_answers(pipe, str(DEMO_IMAGE), prompt, {"do_sample": False, **extra})
        expected = greedy_answers(demo, [[user_turn(QUESTION)]], [str(DEMO_IMAGE)], 6, **extra)[0]
        assert set(answers.values()) == {expected}, answers


def _golden_pipeline_case() -> tuple[dict, str, list[int]]:
    golden = gu.case("V", "single_3crop")
    assert golden["question"] == QUESTION and golden["template"] == "vicuna_v1"
    ids = gu._json(golden["input_ids"])[0] + golden["generated_new_ids"][0]
    return golden, str(FIXTURES / golden["image_files"][0]), ids


def test_pipeline_natively_reproduces_the_golden_greedy_ids(golden_folder):
    from transformers import pipeline

    golden, image, expected = _golden_pipeline_case()
    pipe = pipeline("image-text-to-text", model=str(golden_folder), dtype=torch.float32)
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]}]
    out = pipe(text=messages, max_new_tokens=24, return_tensors=True, generate_kwargs={"do_sample": False})
    ids = out[0]["generated_token_ids"].clone()
    ids[ids == pipe.processor.image_token_id] = gu.ORIGINAL_IMAGE_ID
    assert ids.tolist() == expected


REMOTE_PIPELINE_SCRIPT = """
import json
import torch
from PIL import Image
from transformers import pipeline

QUESTION = "What is shown in this image?"
demo_folder, golden_folder, demo_image, golden_image = sys.argv[1:5]
result = {}

pipe = pipeline("image-text-to-text", model=demo_folder, trust_remote_code=True)
result["modules"] = [type(pipe.model).__module__, type(pipe.processor).__module__]
prompt = pipe.processor.apply_chat_template(
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}], add_generation_prompt=True)
messages = [{"role": "user", "content": [{"type": "image", "image": Image.open(demo_image)},
                                         {"type": "text", "text": QUESTION}]}]
def kwargs():  # fresh per call: transformers 5.17 writes max_new_tokens into generate_kwargs
    return dict(max_new_tokens=6, generate_kwargs={"do_sample": False})
result["demo_chat"] = pipe(text=messages, **kwargs())[0]["generated_text"][-1]["content"].strip()
result["demo_images_text"] = pipe(images=[demo_image], text=prompt, return_full_text=False,
                                  **kwargs())[0]["generated_text"].strip()

pipe = pipeline("image-text-to-text", model=golden_folder, trust_remote_code=True, dtype=torch.float32)
messages = [{"role": "user", "content": [{"type": "image", "path": golden_image}, {"type": "text", "text": QUESTION}]}]
out = pipe(text=messages, max_new_tokens=24, return_tensors=True, generate_kwargs={"do_sample": False})
ids = out[0]["generated_token_ids"].clone()
ids[ids == pipe.processor.image_token_id] = -200
result["golden_ids"] = ids.tolist()
print(json.dumps(result))
"""


def test_pipeline_with_remote_code_without_the_package(demo_folder, golden_folder, demo, tmp_path):
    golden, image, expected = _golden_pipeline_case()
    out = run_hidden(REMOTE_PIPELINE_SCRIPT, str(demo_folder), str(golden_folder), str(DEMO_IMAGE), image, cwd=tmp_path)
    assert all(module.startswith("transformers_modules.") for module in out["modules"]), out["modules"]
    expected_answer = greedy_answers(demo, [[user_turn(QUESTION)]], [str(DEMO_IMAGE)], 6)[0]
    assert out["demo_chat"] == out["demo_images_text"] == expected_answer
    assert out["golden_ids"] == expected


def _load_walkthrough():
    sys.path.insert(0, str(EXAMPLES))
    try:
        import walkthrough
    finally:
        sys.path.remove(str(EXAMPLES))
    return walkthrough


def test_walkthrough_figure_draws_the_grid_on_the_crops_and_the_kept_tokens(demo_folder, demo, tmp_path, capsys):
    walkthrough = _load_walkthrough()
    png = tmp_path / "figure" / "walkthrough.png"
    args = walkthrough.build_parser().parse_args(
        ["--model", str(demo_folder), "--output", str(png), "--max-new-tokens", "4"]
    )
    report = walkthrough.run(args)
    printed = capsys.readouterr().out

    image = Image.open(DEMO_IMAGE).convert("RGB")
    geometry = get_slice_geometry((image.height, image.width))
    (rows, cols), (canvas_h, canvas_w) = geometry.grid, geometry.canvas_size
    # The canvas rebuilt from the model's crops is the original's: the image resized and pasted on black.
    expected = Image.new("RGB", (canvas_w, canvas_h))
    expected.paste(image.resize(geometry.resized_size[::-1], Image.BICUBIC), geometry.paste_offset[::-1])
    assert np.array_equal(report.canvas, np.asarray(expected))

    # The router's choice, computed directly.
    model, processor = demo
    prompt = processor.apply_chat_template([user_turn(QUESTION)], add_generation_prompt=True)
    inputs = processor(images=[image], text=prompt)
    with torch.no_grad():
        features = model.get_image_features(
            inputs["pixel_values"], inputs["image_sizes"], inputs["input_ids"], inputs["attention_mask"]
        )
    kept = features.selected_indices[0].numpy()
    assert np.array_equal(report.kept, kept) and report.budget == features.image_token_budget[0]
    assert f"grid {rows} x {cols}" in printed and f"keeps {len(kept)} of {144 * rows * cols}" in printed

    figure = walkthrough.build_figure(report)
    canvas_axes = figure.axes[0]
    lines = [line for line in canvas_axes.get_lines() if line.get_gid() == "crop-grid"]
    vertical = {float(line.get_xdata()[0]) for line in lines if line.get_xdata()[0] == line.get_xdata()[1]}
    horizontal = {float(line.get_ydata()[0]) for line in lines if line.get_ydata()[0] == line.get_ydata()[1]}
    assert vertical == {336.0 * c for c in range(cols + 1)} and horizontal == {336.0 * r for r in range(rows + 1)}
    assert canvas_axes.get_xlim() == (0, canvas_w) and canvas_axes.get_ylim() == (canvas_h, 0)

    def cells(gid: str) -> set:
        (collection,) = [c for c in canvas_axes.collections if c.get_gid() == gid]
        corners = {tuple(path.vertices.min(0).round().astype(int)) for path in collection.get_paths()}
        assert len(corners) == len(collection.get_paths())
        return corners

    # Merged raster index t = (12 r + i) * (12 cols) + 12 c + j is query 12 i + j of crop (r, c): a 28-pixel cell
    # at x = (12 c + j) * 28, y = (12 r + i) * 28 on the canvas.
    def corner(t: int) -> tuple:
        return int(t % (12 * cols)) * 28, int(t // (12 * cols)) * 28

    assert cells("kept-tokens") == {corner(t) for t in kept}
    assert cells("dropped-tokens") == {corner(t) for t in set(range(144 * rows * cols)) - set(kept.tolist())}

    assert png.is_file() and png.stat().st_size < 300_000
    assert Image.open(png).size == (1150, 560)
    committed = PROJECT_ROOT / "docs" / "walkthrough.png"
    assert committed.is_file() and committed.stat().st_size < 300_000


BAD_INPUT = [
    ("generate.py", ["--images", "missing.png"], "image file not found: missing.png"),
    ("generate.py", ["--dtype", "float8"], "invalid choice"),
    ("generate.py", ["--prompt", "<image> and <image>?"], "2 <image> placeholder(s) but 1 image(s)"),
    ("generate.py", ["--batch-size", "0"], "--batch-size must be at least 1"),
    ("generate.py", ["--images", "."], "no image files"),
    ("chat.py", ["--image", "missing.png"], "image file not found: missing.png"),
    ("chat.py", ["--dtype", "float8"], "invalid choice"),
    ("pipeline.py", ["--image", "missing.png"], "image file not found: missing.png"),
    ("pipeline.py", ["--dtype", "float8"], "invalid choice"),
    ("pipeline.py", ["--prompt", "<image> and <image>?"], "2 <image> placeholder(s) but 1 image(s)"),
    ("walkthrough.py", ["--image", "missing.png"], "image file not found: missing.png"),
    ("walkthrough.py", ["--dtype", "float8"], "invalid choice"),
    ("walkthrough.py", ["--prompt", "<image> and <image>?"], "2 <image> placeholder(s) but 1 image(s)"),
    ("walkthrough.py", ["--router-top-p", "1.5"], "--router-top-p must be in (0, 1]"),
]


@pytest.mark.parametrize("script, args, message", BAD_INPUT, ids=[f"{s}-{a[0]}" for s, a, _ in BAD_INPUT])
def test_bad_command_line_input_is_one_line_without_traceback(script, args, message, tmp_path):
    result = run_example(script, *args, cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert message in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1, result.stderr


@pytest.mark.parametrize(
    "script, args, header, rate_column",
    [
        (
            "benchmark_gpu.py",
            ["--batches", "1", "--modes", "dynamic", "--new-tokens", "4"],
            "| batch | cache | processor PIL / torch ms |",
            8,
        ),
        (
            "benchmark_training_gpu.py",
            ["--batch", "2", "--steps", "1", "--text-length", "64"],
            "| training | gradient checkpointing | assembled length |",
            6,
        ),
        (  # exits with an error if a batched row differs from its single run
            "benchmark_batching.py",
            ["--pairs", "3", "--batches", "1", "2", "--new-tokens", "16", "--decode-steps", "2"],
            "| batch | processor s | vision s |",
            8,
        ),
    ],
)
def test_benchmarks_run_at_tiny_shapes_on_the_cpu(script, args, header, rate_column):
    """The benchmark scripts (run at full size on a GPU machine, or for minutes on a CPU) print their table at tiny
    shapes anywhere."""
    result = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "benchmarks" / script),
            "--tiny",
            "--device",
            "cpu",
            "--dtype",
            "float32",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = result.stdout[result.stdout.index(header) :].split("\n\n")[0].splitlines()
    rows = [line.split("|") for line in table[2:] if line.startswith("| ") and "reference" not in line]
    # Decode tokens/s, training samples/s: numbers, never asserted on (timings vary on a busy machine).
    assert rows and all(isinstance(float(row[rate_column]), float) for row in rows)
    if script == "benchmark_training_gpu.py":
        assert [row[2].strip() for row in rows] == ["off", "on", "off", "on"]
        assert all(int(row[3]) > 64 + 576 for row in rows)  # text + the image's global and kept local tokens


def test_gpu_benchmark_measures_first_token_and_decode_inside_one_generate_call(monkeypatch):
    """First-token time and decode rate come from per-token timestamps of the same `generate` call (a fake clock here,
    so nothing depends on the machine's speed); never from the difference of two separately timed runs, which a busy
    machine can make negative."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmark_gpu", EXAMPLES / "benchmarks" / "benchmark_gpu.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    ticks = iter(range(1000))
    monkeypatch.setattr(benchmark.time, "perf_counter", lambda: float(next(ticks)))

    class Model:
        calls = 0

        def generate(self, logits_processor, max_new_tokens, **kwargs):
            self.calls += 1
            next(ticks)  # the vision path and the prefill take one tick
            for _ in range(max_new_tokens):
                logits_processor(None, None)
                next(ticks), next(ticks)  # each later step takes three ticks with the clock's own

    model = Model()
    first_s, step_s = benchmark.timed_generate(model, {}, "cpu", repeats=2, max_new_tokens=5)
    assert model.calls == 3  # one warm-up, two measured
    assert (first_s, step_s) == (2.0, 3.0)
    assert benchmark.timed_generate(model, {}, "cpu", repeats=1, max_new_tokens=1)[1] != step_s  # NaN: no step
