"""Training data: dataset and collator against the goldens of the authors' code, bad input, sampler."""

from __future__ import annotations

import json
from functools import lru_cache

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from conftest import FIXTURES, VARIANTS
from slime_hf import SliMEProcessor
from slime_hf.training import SliMEDataCollator, SliMEDataset
from slime_hf.training.data import (
    IGNORE_INDEX,
    load_records,
    normalize_record,
    original_arithmetic_labels,
    render_conversation,
    tokenize_with_targets,
)
from slime_hf.training.sampler import ModalityLengthGroupedSampler, get_modality_length_grouped_indices
from training_helpers import IMAGE_FOLDER


ORIGINAL_IMAGE_ID = -200
KINDS = {"sft": None, "plain": "plain"}  # golden file -> template (None: the tokenizer's chat template)


@lru_cache(maxsize=None)
def processor(variant: str) -> SliMEProcessor:
    return SliMEProcessor.from_pretrained(FIXTURES / variant / "checkpoint")


@lru_cache(maxsize=None)
def golden_samples(variant: str, kind: str) -> dict:
    return json.loads((FIXTURES / variant / "training" / f"{kind}_samples.json").read_text())


def dataset(variant: str, kind: str, **kwargs) -> SliMEDataset:
    return SliMEDataset(
        golden_samples(variant, kind)["samples"], IMAGE_FOLDER, processor(variant), KINDS[kind], **kwargs
    )


def golden_ids(variant: str, ids: list[int]) -> list[int]:
    return [processor(variant).image_token_id if i == ORIGINAL_IMAGE_ID else i for i in ids]


def runs(labels: list[int]) -> list[list[int]]:
    """Maximal runs of consecutive target labels."""
    out, current = [], []
    for label in labels + [IGNORE_INDEX]:
        if label == IGNORE_INDEX:
            if current:
                out.append(current)
            current = []
        else:
            current.append(label)
    return out


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_dataset_gives_the_golden_ids_and_labels(variant, kind):
    golden = golden_samples(variant, kind)
    data = dataset(variant, kind)
    assert len(data) == len(golden["items"])
    flagged = 0
    for index, info in enumerate(golden["items"]):
        item = data[index]
        assert item["input_ids"].tolist() == golden_ids(variant, golden[f"item{index}_input_ids"]), index
        if not info["tokenization_mismatch"]:
            assert item["labels"].tolist() == golden[f"item{index}_labels"], index
            continue
        # The original masked the whole sample (its -1 per round assumption fails on the tiny vocabulary): exactly the
        # assistant turns and their end marker are targets instead.
        flagged += 1
        tokenizer = processor(variant).tokenizer
        answers = [turn["value"] for turn in golden["samples"][index]["conversations"] if turn["from"] == "gpt"]
        target_runs = runs(item["labels"].tolist())
        assert len(target_runs) == len(answers)
        for run, answer in zip(target_runs, answers):
            assert run[-1] == tokenizer.eos_token_id
            assert tokenizer.decode(run[:-1]).strip() == answer
        labels, ids = item["labels"], item["input_ids"]
        assert torch.equal(labels[labels != IGNORE_INDEX], ids[labels != IGNORE_INDEX])
    assert flagged == (1 if (variant, kind) == ("V", "sft") else 0)
    assert data.num_label_fixes == flagged


@pytest.mark.parametrize("variant", VARIANTS)
def test_original_label_arithmetic_is_reproduced_for_the_fix_count(variant):
    """The counter of 'labels differ from the original's arithmetic' runs that arithmetic: it gives the golden labels,
    the all-masked mismatch sample included."""
    golden = golden_samples(variant, "sft")
    proc = processor(variant)
    template = "vicuna_v1" if variant == "V" else "llama3"
    for index, record in enumerate(golden["samples"]):
        rendered = render_conversation(normalize_record(record, index), template, proc)
        assert rendered.text == golden["items"][index]["prompt"].replace("<|eot_conversation|>", "")
        ids, _ = tokenize_with_targets(rendered, proc)
        assert original_arithmetic_labels(rendered, ids, template, proc, 2048) == golden[f"item{index}_labels"]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_collator_gives_the_golden_batch(variant, kind):
    data = dataset(variant, kind)
    batch = SliMEDataCollator(processor(variant))([data[i] for i in range(len(data))])
    handle = safe_open(str(FIXTURES / variant / "training" / "batches.safetensors"), "pt")
    rows = json.loads(handle.metadata()["rows"])[kind]
    golden_input_ids = handle.get_tensor(f"{kind}.input_ids")
    golden_input_ids = golden_input_ids.masked_fill(
        golden_input_ids == ORIGINAL_IMAGE_ID, processor(variant).image_token_id
    )
    assert torch.equal(batch["input_ids"], golden_input_ids)
    assert torch.equal(batch["attention_mask"], handle.get_tensor(f"{kind}.attention_mask"))
    expected_labels = handle.get_tensor(f"{kind}.labels")
    for index, info in enumerate(golden_samples(variant, kind)["items"]):
        if not info["tokenization_mismatch"]:
            assert torch.equal(batch["labels"][index], expected_labels[index])
    # Images: one per image row, in row order; (height, width); views padded to the batch's own maximum.
    image_rows = [r for r, name in enumerate(rows) if name]
    sizes_wh = handle.get_tensor(f"{kind}.image_sizes")[image_rows]
    assert torch.equal(batch["image_sizes"], sizes_wh.flip(1))
    pixels = np.load(FIXTURES / variant / "training" / "pixels.npz")
    crops = handle.get_tensor(f"{kind}.image_nums")[image_rows]
    assert batch["pixel_values"].shape[1] == int(crops.max())
    for image, row in enumerate(image_rows):
        expected = torch.from_numpy(pixels[rows[row].removesuffix(".png")])
        assert torch.equal(batch["pixel_values"][image, : len(expected)], expected)
        assert not batch["pixel_values"][image, len(expected) :].any()


def test_text_only_batch_has_no_image_keys_and_mixed_batches_keep_the_order():
    data = dataset("V", "sft")
    collate = SliMEDataCollator(processor("V"))
    text_only = collate([data[2]])
    assert "pixel_values" not in text_only and "image_sizes" not in text_only
    mixed = collate([data[2], data[0]])
    assert mixed["pixel_values"].shape[0] == 1
    assert (mixed["input_ids"][1] == processor("V").image_token_id).sum() == 1


def _records(**overrides) -> list[dict]:
    record = {
        "id": "s0",
        "image": "odd_337x211.png",
        "conversations": [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "Stripes."}],
    }
    record.update(overrides)
    return [record]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"image": "no_such_file.png"}, "cannot load image"),
        (
            {"conversations": [{"from": "human", "value": "What is this?"}, {"from": "gpt", "value": "x"}]},
            "1 image(s) but 0 <image> placeholder",
        ),
        ({"image": None}, "0 image(s) but 1 <image> placeholder"),
        (
            {"conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "human", "value": "again"}]},
            "alternate",
        ),
        ({"conversations": [{"from": "robot", "value": "<image>\nHi"}]}, "unknown speaker"),
    ],
)
def test_bad_samples_raise_a_clear_error_naming_the_sample(overrides, message):
    data = SliMEDataset(_records(**overrides), IMAGE_FOLDER, processor("V"), "vicuna_v1")
    with pytest.raises(ValueError, match="sample 's0'") as error:
        data[0]
    assert message in str(error.value)


def test_corrupt_image_is_refused_or_skipped_and_counted(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    Image.open(IMAGE_FOLDER / "odd_337x211.png").save(tmp_path / "good.png")
    records = _records(image="broken.png") + _records(id="s1", image="good.png")
    strict = SliMEDataset(records, tmp_path, processor("V"), "vicuna_v1")
    with pytest.raises(ValueError, match="sample 's0'.*broken.png"):
        strict[0]
    lenient = SliMEDataset(records, tmp_path, processor("V"), "vicuna_v1", skip_bad_samples=True)
    items = [lenient[0], lenient[1]]
    assert items[0] is None and lenient.num_skipped == 1
    batch = SliMEDataCollator(processor("V"))(items)
    assert batch["input_ids"].shape[0] == 1 and batch["pixel_values"].shape[0] == 1


def test_images_outside_the_image_folder_are_refused_unless_allowed(tmp_path):
    """A data file cannot make training read files outside --image_folder (an absolute path, '../'): the sample is
    refused when it is read, or skipped and counted; --allow_images_outside_folder permits it."""
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    Image.open(IMAGE_FOLDER / "odd_337x211.png").save(tmp_path / "outside.png")
    Image.open(IMAGE_FOLDER / "odd_337x211.png").save(folder / "sub" / "inside.png")
    records = (
        _records(image=str(tmp_path / "outside.png"))
        + _records(id="s1", image="../outside.png")
        + _records(id="s2", image="sub/../sub/inside.png")
    )
    strict = SliMEDataset(records, folder, processor("V"), "vicuna_v1")
    for index, sample_id in ((0, "s0"), (1, "s1")):
        with pytest.raises(
            ValueError, match=f"sample '{sample_id}'.*outside the image folder.*--allow_images_outside_folder"
        ):
            strict[index]
    assert strict[2]["pixel_values"].shape[0] == 1  # '..' that stays inside is fine
    lenient = SliMEDataset(records, folder, processor("V"), "vicuna_v1", skip_bad_samples=True)
    assert [lenient[i] is None for i in range(3)] == [True, True, False] and lenient.num_skipped == 2
    allowed = SliMEDataset(records, folder, processor("V"), "vicuna_v1", allow_images_outside_folder=True)
    assert all(allowed[i]["pixel_values"].shape[0] == 1 for i in range(3))


@pytest.mark.parametrize(
    "conversations, message",
    [
        ([], "has an empty 'conversations' list"),
        ("hello", "'conversations' must be a list of turns, got str"),
        (None, "has no 'conversations' list"),
    ],
)
def test_missing_empty_or_mistyped_conversations_are_told_apart(conversations, message):
    record = _records(conversations=conversations)[0]
    if conversations is None:
        del record["conversations"]
    with pytest.raises(ValueError, match="sample 's0'") as error:
        normalize_record(record, 0)
    assert message in str(error.value)


def test_malformed_json_names_the_file_and_line(tmp_path):
    (tmp_path / "bad.json").write_text('[{"id": 1,,}]')
    (tmp_path / "bad.jsonl").write_text('{"id": 1}\n{"id": 2,,}\n')
    with pytest.raises(ValueError, match=r"bad\.json is not valid JSON: .*line 1"):
        load_records(tmp_path / "bad.json")
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 2: not valid JSON"):
        load_records(tmp_path / "bad.jsonl")


LONG_ANSWER = " ".join(["stripes"] * 300)


def test_text_longer_than_the_limit_is_cut_at_the_end():
    """As the original's tokenizer/collator: the text alone is cut to model_max_length tokens (the model cuts the
    assembled sequence after routing, see test_training_truncation.py)."""
    records = [
        {
            "id": "t0",
            "conversations": [{"from": "human", "value": "Describe stripes."}, {"from": "gpt", "value": LONG_ANSWER}],
        }
    ]
    full = SliMEDataset(records, None, processor("V"), "vicuna_v1")[0]
    data = SliMEDataset(records, None, processor("V"), "vicuna_v1", model_max_length=100)
    item = data[0]
    assert len(full["input_ids"]) > 100 and len(item["input_ids"]) == 100
    assert torch.equal(item["input_ids"], full["input_ids"][:100])
    assert torch.equal(item["labels"], full["labels"][:100])
    assert data.num_truncated == 1


def _image_sample_end(budget: int) -> int:
    """Assembled position where the image block of `_records()` ends with `budget` image positions."""
    item = SliMEDataset(_records(), IMAGE_FOLDER, processor("V"), "vicuna_v1")[0]
    position = int((item["input_ids"] == processor("V").image_token_id).nonzero()[0, 0])
    return position + budget


def test_a_sample_whose_image_could_reach_past_the_limit_is_refused():
    # odd_337x211 has 2 local crops: with every local token kept its block takes 576 + 1 + 2 * 144 positions.
    end = _image_sample_end(576 + 1 + 2 * 144)
    fits = SliMEDataset(_records(), IMAGE_FOLDER, processor("V"), "vicuna_v1", model_max_length=end)
    assert fits[0] is not None and fits.num_truncated == 0
    short = SliMEDataset(_records(), IMAGE_FOLDER, processor("V"), "vicuna_v1", model_max_length=end - 1)
    with pytest.raises(
        ValueError,
        match=rf"sample 's0'.*image 0 may end at assembled position {end}.*"
        rf"model_max_length={end - 1}",
    ):
        short[0]
    skipping = SliMEDataset(
        _records(), IMAGE_FOLDER, processor("V"), "vicuna_v1", model_max_length=end - 1, skip_bad_samples=True
    )
    assert skipping[0] is None and skipping.num_skipped == 1


def test_the_refusal_uses_the_stage_token_budget():
    from slime_hf import SliMEForConditionalGeneration
    from slime_hf.training import apply_stage_config

    model = SliMEForConditionalGeneration.from_pretrained(FIXTURES / "V" / "checkpoint")
    apply_stage_config(model, "1a")  # global view only: exactly 576 positions per image
    end = _image_sample_end(576)
    assert (
        SliMEDataset(
            _records(), IMAGE_FOLDER, processor("V"), "vicuna_v1", model_max_length=end, model_config=model.config
        )[0]
        is not None
    )
    with pytest.raises(ValueError, match="may end at assembled position"):
        SliMEDataset(
            _records(), IMAGE_FOLDER, processor("V"), "vicuna_v1", model_max_length=end - 1, model_config=model.config
        )[0]


def test_a_text_cut_that_would_remove_an_image_is_refused():
    records = _records(
        conversations=[{"from": "human", "value": "Describe. " * 60 + "<image>"}, {"from": "gpt", "value": "Stripes."}]
    )
    with pytest.raises(ValueError, match="sample 's0'.*cut would remove an image"):
        SliMEDataset(records, IMAGE_FOLDER, processor("V"), "vicuna_v1", model_max_length=50)[0]


def test_jsonl_files_and_hf_datasets_are_read(tmp_path):
    samples = golden_samples("L", "sft")["samples"]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(s) for s in samples[:3]) + "\n")
    (tmp_path / "b.json").write_text(json.dumps(samples[3:]))
    data = SliMEDataset([str(tmp_path / "a.jsonl"), str(tmp_path / "b.json")], IMAGE_FOLDER, processor("L"))
    assert len(data) == len(samples) and data.template == "llama3"
    reference = dataset("L", "sft")
    assert torch.equal(data[4]["input_ids"], reference[4]["input_ids"])

    datasets = pytest.importorskip("datasets")
    records = [
        {
            "id": s["id"],
            "image": Image.open(IMAGE_FOLDER / s["image"]) if s.get("image") else None,
            "conversations": s["conversations"],
        }
        for s in samples[:3]
    ]
    hf = datasets.Dataset.from_list(
        records,
        features=datasets.Features(
            {
                "id": datasets.Value("string"),
                "image": datasets.Image(),
                "conversations": [{"from": datasets.Value("string"), "value": datasets.Value("string")}],
            }
        ),
    )
    from_hf = SliMEDataset(hf, None, processor("L"))
    for index in range(3):
        assert torch.equal(from_hf[index]["input_ids"], reference[index]["input_ids"])
    assert torch.equal(from_hf[0]["pixel_values"], reference[0]["pixel_values"])


def test_modality_lengths_and_grouped_sampler():
    lengths = dataset("V", "sft").modality_lengths
    assert [length > 0 for length in lengths] == [True, True, False, True, True, True]
    # 20 image and 9 text-only samples, batch 2, 2 ranks: every full mega-batch holds one modality.
    lengths = [5 + (i % 7) for i in range(20)] + [-(3 + i) for i in range(9)]
    order = get_modality_length_grouped_indices(
        lengths, batch_size=2, world_size=2, generator=torch.Generator().manual_seed(0)
    )
    assert sorted(order) == list(range(len(lengths)))
    megabatches = [order[i : i + 4] for i in range(0, len(order), 4)]
    for megabatch in megabatches[:-1]:
        assert len({lengths[i] > 0 for i in megabatch}) == 1
    sampler = ModalityLengthGroupedSampler(lengths, batch_size=2, world_size=2, seed=3)
    assert list(sampler) == list(sampler)
    sampler.set_epoch(1)
    assert sorted(sampler) == list(range(len(lengths)))
