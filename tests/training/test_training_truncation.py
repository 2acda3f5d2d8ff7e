"""The training length limit: the assembled sequence, after routing, is cut at the end to
`config.training_max_length` as the original cuts it, but never inside an image block (a sample whose cut would fall
in an image is refused or skipped and counted, not silently mangled); the cuts are counted and logged."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import FIXTURES
from slime_hf import SliMEForConditionalGeneration, SliMEProcessor
from slime_hf.training import (
    SliMEDataCollator,
    SliMEDataset,
    SliMETrainer,
    prepare_model_for_stage,
)
from training_helpers import IMAGE_FOLDER, cpu_training_arguments


LONG_ANSWER = " ".join(["stripes"] * 120)


def record(sample_id: str, question: str, answer: str, image: str | list | None = "odd_337x211.png") -> dict:
    out = {"id": sample_id, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    if image is not None:
        out["image"] = image
    return out


@pytest.fixture(scope="module")
def processor():
    return SliMEProcessor.from_pretrained(FIXTURES / "V" / "checkpoint")


@pytest.fixture(scope="module")
def model():
    model = SliMEForConditionalGeneration.from_pretrained(FIXTURES / "V" / "checkpoint", dtype=torch.float32)
    prepare_model_for_stage(model, "3")  # mixture + separator + routed local tokens (top-p 0.95)
    return model.eval()


def collate(processor, records: list[dict]) -> dict:
    data = SliMEDataset(records, IMAGE_FOLDER, processor, "vicuna_v1", model_max_length=4096)
    return SliMEDataCollator(processor)([data[i] for i in range(len(data))])


def run(model, batch: dict, limit: int | None):
    model.config.training_max_length = limit
    try:
        with torch.no_grad():
            return model(**batch), model.model(**batch)
    finally:
        model.config.training_max_length = None


def test_rows_are_cut_at_the_end_after_routing(model, processor):
    batch = collate(
        processor,
        [record("long", "<image>\nDescribe.", LONG_ANSWER), record("short", "<image>\nWhat is this?", "Stripes.")],
    )
    full, full_inner = run(model, batch, None)
    lengths = full.attention_mask.sum(1)
    assert full.truncated_positions is None
    limit = int(lengths[0]) - 40  # inside the long answer, past the short row's end
    assert int(lengths[1]) < limit
    cut, cut_inner = run(model, batch, limit)

    assert cut.truncated_positions.tolist() == [40, 0]
    assert cut.attention_mask.sum(1).tolist() == [limit, int(lengths[1])]
    # The router saw the same text: the kept local tokens do not change.
    for a, b in zip(full.selected_indices, cut.selected_indices):
        assert torch.equal(a, b)
    # Causal attention: the kept positions' logits are those of the uncut run.
    assert torch.allclose(cut.logits[0], full.logits[0, :limit], atol=1e-5)
    assert torch.allclose(cut.logits[1, : lengths[1]], full.logits[1, : lengths[1]], atol=1e-5)
    # The assembled labels are cut with the sequence, and the loss is the mean over the targets that remain.
    assert torch.equal(cut_inner.labels[0], full_inner.labels[0, :limit])
    labels = full_inner.labels.clone()
    labels[0, limit:] = -100
    expected = F.cross_entropy(full.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    assert (full_inner.labels[0, limit:] != -100).sum() > 0  # some targets were cut
    assert abs(cut.loss.item() - expected.item()) <= 1e-5


def test_a_cut_inside_or_before_an_image_block_is_refused(model, processor):
    batch = collate(processor, [record("one", "<image>\nDescribe.", LONG_ANSWER)])
    _, inner = run(model, batch, None)
    image_start = int((batch["input_ids"][0] == processor.image_token_id).nonzero()[0, 0])
    image_end = image_start + inner.image_token_budget[0]["total"]
    with pytest.raises(
        ValueError,
        match=rf"row 0: .*training_max_length={image_end - 1} would fall inside "
        rf"image 0 \(positions {image_start}-{image_end - 1}\)",
    ):
        run(model, batch, image_end - 1)
    assert run(model, batch, image_end)[0].truncated_positions[0] > 0

    two = collate(
        processor,
        [record("two", "<image>\n<image>\nDescribe.", "Stripes.", image=["odd_337x211.png", "odd_337x211.png"])],
    )
    assert two["pixel_values"].shape[0] == 2
    _, inner = run(model, two, None)
    second_index = int((two["input_ids"][0] == processor.image_token_id).nonzero()[1, 0])
    second_start = second_index - 1 + inner.image_token_budget[0]["total"]
    with pytest.raises(ValueError, match=rf"row 0: .* would drop image 1 \(positions {second_start}-"):
        run(model, two, second_start)


def test_text_only_rows_are_cut_too(model, processor):
    data = SliMEDataset([record("text", "Describe stripes.", LONG_ANSWER, image=None)], None, processor, "vicuna_v1")
    batch = SliMEDataCollator(processor)([data[0]])
    length = batch["input_ids"].shape[1]
    full, _ = run(model, batch, None)
    cut, inner = run(model, batch, 50)
    assert cut.truncated_positions.tolist() == [length - 50]
    assert cut.logits.shape[1] == 50
    assert torch.allclose(cut.logits[0], full.logits[0, :50], atol=1e-5)
    assert torch.equal(inner.labels[0], batch["labels"][0, :50])


def test_the_router_reads_the_text_up_to_the_limit(model, processor):
    """As the original's get_pure_text_embedding: the router's text is cut to the same limit."""
    batch = collate(processor, [record("one", "<image>\nDescribe.", LONG_ANSWER)])
    limit = 100
    text_tokens = batch["input_ids"].shape[1] - 1
    assert text_tokens > limit
    image_index = int((batch["input_ids"][0] == processor.image_token_id).nonzero()[0, 0])
    assert image_index < limit
    model.config.training_max_length = limit
    try:
        with torch.no_grad():
            routed = model.get_image_features(
                batch["pixel_values"],
                batch["image_sizes"],
                batch["input_ids"],
                batch["attention_mask"],
                batch["labels"],
            )
    finally:
        model.config.training_max_length = None
    head = {key: batch[key][:, : limit + 1] for key in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad():
        reference = model.get_image_features(batch["pixel_values"], batch["image_sizes"], **head)
    assert torch.equal(routed.selected_indices[0], reference.selected_indices[0])
    assert torch.allclose(routed.router_scores[0], reference.router_scores[0])


def test_the_trainer_counts_and_logs_the_cut_samples(processor, tmp_path, caplog):
    model = SliMEForConditionalGeneration.from_pretrained(FIXTURES / "V" / "checkpoint", dtype=torch.float32)
    prepare_model_for_stage(model, "1a")  # global view only: 576 positions per image, no router noise
    records = [record("long", "<image>\nDescribe.", LONG_ANSWER)]
    item = SliMEDataset(records, IMAGE_FOLDER, processor, "plain")[0]
    assembled = len(item["input_ids"]) - 1 + 576
    limit = assembled - 30
    model.config.training_max_length = limit
    data = SliMEDataset(records, IMAGE_FOLDER, processor, "plain", model_max_length=limit, model_config=model.config)
    assert len(data[0]["input_ids"]) == len(item["input_ids"])  # the data side does not cut: the model does
    args = cpu_training_arguments(tmp_path / "out", max_steps=2, logging_steps=1, model_max_length=limit)
    trainer = SliMETrainer(model=model, args=args, train_dataset=data, data_collator=SliMEDataCollator(processor))
    with caplog.at_level("WARNING"):
        trainer.train()
    logged = [entry["truncated_samples"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged == [1, 2]
    assert trainer.num_truncated_samples == 2
    assert "cut at the end after routing" in caplog.text
    assert all(torch.isfinite(torch.tensor(entry["loss"])) for entry in trainer.state.log_history if "loss" in entry)
