"""trl's SFTTrainer on SliME: the vision-language collator path with SFTConfig's defaults, the loss against the
model's own, assistant-only targets against SliMEDataset's labels, processor truncation and empty media arguments."""

from __future__ import annotations

import copy
import math

import datasets
import pytest
import torch
import transformers
from packaging.version import Version
from PIL import Image
from trl import SFTConfig, SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

from conftest import FIXTURES, VARIANTS
from slime_hf import SliMEForConditionalGeneration, SliMEProcessor
from slime_hf.training.data import SliMEDataset


# trl refuses assistant-only loss on vision datasets before transformers 5.18 (SFTTrainer's own check).
NEEDS_518 = pytest.mark.skipif(
    Version(transformers.__version__) < Version("5.18.0.dev0"),
    reason="trl's SFTTrainer refuses assistant_only_loss for vision datasets on transformers < 5.18",
)

CONVERSATIONS = [
    [("user", "What is this?"), ("assistant", "A red box."), ("user", "Sure?"), ("assistant", " Yes, quite sure.")],
    [("user", "Describe the picture."), ("assistant", "It is blue.")],
    [("user", "Colour?"), ("assistant", "Green, mostly.")],
    [("user", "And this one?"), ("assistant", "Yellow.")],
]


def _image(index: int) -> Image.Image:
    colours = [(200, 10, 10), (10, 10, 200), (10, 180, 10), (220, 220, 0)]
    return Image.new("RGB", (48 + 8 * index, 32 + 4 * index), colours[index % len(colours)])


def _examples() -> list[dict]:
    return [
        {"images": [_image(i)], "messages": [{"role": role, "content": text} for role, text in turns]}
        for i, turns in enumerate(CONVERSATIONS)
    ]


def _records() -> list[dict]:
    """The same conversations in LLaVA format, for SliMEDataset."""
    records = []
    for i, turns in enumerate(CONVERSATIONS):
        values = [("<image>\n" if j == 0 else "") + text for j, (_, text) in enumerate(turns)]
        records.append(
            {
                "id": f"s{i}",
                "image": [_image(i)],
                "conversations": [
                    {"from": "human" if role == "user" else "gpt", "value": value}
                    for (role, _), value in zip(turns, values)
                ],
            }
        )
    return records


@pytest.fixture(scope="module")
def processors() -> dict:
    return {v: SliMEProcessor.from_pretrained(FIXTURES / v / "checkpoint") for v in VARIANTS}


def _model(variant: str) -> SliMEForConditionalGeneration:
    return SliMEForConditionalGeneration.from_pretrained(FIXTURES / variant / "checkpoint", dtype=torch.float32)


def _config(tmp_path, **overrides) -> SFTConfig:
    # SFTConfig's defaults, plus where to write, how long, and a tiny batch; `use_cpu` because the tests run without
    # an accelerator (SFTConfig's default bf16 needs it said).
    settings = dict(output_dir=str(tmp_path), max_steps=2, report_to="none", per_device_train_batch_size=2)
    if not torch.cuda.is_available():
        settings["use_cpu"] = True
    settings.update(overrides)
    return SFTConfig(**settings)


# ---------------------------------------------------------------------------------------------------------------------
# (a) SFTTrainer trains with SFTConfig's defaults
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_sft_trainer_trains_with_default_config(processors, variant, tmp_path):
    trainer = SFTTrainer(
        model=_model(variant),
        args=_config(tmp_path),
        train_dataset=datasets.Dataset.from_list(_examples()),
        processing_class=processors[variant],
    )
    assert trainer.args.max_length == 1024  # the default: the collator asks the processor to truncate
    result = trainer.train()
    assert math.isfinite(result.training_loss)
    assert trainer.state.global_step == 2


# ---------------------------------------------------------------------------------------------------------------------
# (b) trl's loss equals the model's own labelled loss
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_trl_loss_equals_model_loss(processors, variant, tmp_path):
    model = _model(variant)
    trainer = SFTTrainer(
        model=model,
        args=_config(tmp_path),
        train_dataset=datasets.Dataset.from_list(_examples()),
        processing_class=processors[variant],
    )
    batch = trainer.data_collator(copy.deepcopy(_examples()))
    model.eval()
    with torch.no_grad():
        own = model(**{key: value.clone() for key, value in batch.items()}).loss
        ours = trainer.compute_loss(model, dict(batch))
    assert torch.isfinite(own)
    assert abs(ours.item() - own.item()) < 1e-5


# ---------------------------------------------------------------------------------------------------------------------
# Training rows and assistant-only targets against SliMEDataset (SliMETrainer's data)
# ---------------------------------------------------------------------------------------------------------------------


def _dataset_items(processor: SliMEProcessor) -> list[dict]:
    dataset = SliMEDataset(_records(), None, processor)
    return [dataset[i] for i in range(len(dataset))]


def _assert_rows_match(batch: dict, items: list[dict], compare_labels: bool) -> None:
    for row, item in enumerate(items):
        length = len(item["input_ids"])
        assert int(batch["attention_mask"][row].sum()) == length
        assert batch["input_ids"][row, :length].tolist() == item["input_ids"].tolist()
        if compare_labels:
            assert batch["labels"][row, :length].tolist() == item["labels"].tolist()
            assert bool((batch["labels"][row, length:] == -100).all())


@pytest.mark.parametrize("variant", VARIANTS)
def test_trl_rows_equal_training_and_inference_ids(processors, variant):
    """trl's collator asks for no special tokens; the rows still start with BOS, as inference prompts and
    SliMEDataset's rows do."""
    processor = processors[variant]
    batch = DataCollatorForVisionLanguageModeling(processor, max_length=1024)(copy.deepcopy(_examples()))
    assert bool((batch["input_ids"][:, 0] == processor.tokenizer.bos_token_id).all())
    _assert_rows_match(batch, _dataset_items(processor), compare_labels=False)
    for row, example in enumerate(_examples()):
        question = [{"type": "image"}, {"type": "text", "text": example["messages"][0]["content"]}]
        text = processor.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
        prompt = processor(text=text, images=example["images"])["input_ids"][0].tolist()
        # The inference prompt is the row's beginning (its last piece may merge with the answer's first one).
        assert batch["input_ids"][row, : len(prompt) - 1].tolist() == prompt[:-1]


@pytest.mark.parametrize("variant", VARIANTS)
def test_assistant_only_targets_equal_slime_dataset_labels(processors, variant):
    processor = processors[variant]
    collator = DataCollatorForVisionLanguageModeling(processor, max_length=1024, assistant_only_loss=True)
    batch = collator(copy.deepcopy(_examples()))
    _assert_rows_match(batch, _dataset_items(processor), compare_labels=True)


@NEEDS_518
@pytest.mark.parametrize("variant", VARIANTS)
def test_sft_trainer_assistant_only_loss_targets(processors, variant, tmp_path):
    trainer = SFTTrainer(
        model=_model(variant),
        args=_config(tmp_path, assistant_only_loss=True),
        train_dataset=datasets.Dataset.from_list(_examples()),
        processing_class=processors[variant],
    )
    assert trainer.chat_template is None  # the templates' own {% generation %} markers are used
    batch = trainer.data_collator(copy.deepcopy(_examples()))
    _assert_rows_match(batch, _dataset_items(processors[variant]), compare_labels=True)


@pytest.mark.parametrize("name", ["vicuna_v1", "llama3", "llama3_original"])
def test_assistant_tokens_mask_covers_answers_and_end_markers(processors, name):
    processor = processors["V" if name == "vicuna_v1" else "L"]
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello there."}]},
    ]
    out = processor.apply_chat_template(
        messages, chat_template=name, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids = out["input_ids"][0][out["assistant_masks"][0].bool()].tolist()
    end = "</s>" if name == "vicuna_v1" else "<|eot_id|>"
    assert processor.tokenizer.decode(ids).replace(" ", "").startswith("Hellothere.")
    assert end in processor.tokenizer.decode(ids)


# ---------------------------------------------------------------------------------------------------------------------
# (d) processor truncation
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_truncation_keeps_placeholders(processors, variant):
    processor = processors[variant]
    texts = ["<image>\nA long caption, " + "word " * 40, "Short <image> prompt."]
    full = [processor.tokenize_prompt(t) for t in texts]
    limit = len(full[1]) + 3
    out = processor(text=texts, images=[_image(0), _image(1)], truncation=True, max_length=limit, padding_side="right")
    assert out["input_ids"].shape[1] == limit
    assert out["input_ids"][0].tolist() == full[0][:limit]
    assert out["input_ids"][1, : len(full[1])].tolist() == full[1]
    assert int((out["input_ids"] == processor.image_token_id).sum()) == 2
    assert out["pixel_values"].shape[0] == 2
    # Without truncation the row is kept whole.
    assert processor(text=texts[0], images=[_image(0)])["input_ids"].shape[1] == len(full[0])


@pytest.mark.parametrize("variant", VARIANTS)
def test_truncation_refuses_to_drop_a_placeholder(processors, variant):
    processor = processors[variant]
    texts = ["Fine <image>", "A long question " + "word " * 30 + "<image>"]
    with pytest.raises(ValueError, match=r"Sample 1 .*would drop 1 <image> placeholder"):
        processor(text=texts, images=[_image(0), _image(1)], truncation=True, max_length=12)
    with pytest.raises(ValueError, match=r"The sample .*would drop 1 <image> placeholder"):
        processor(text=texts[1], images=[_image(1)], truncation=True, max_length=12)
    with pytest.raises(ValueError, match="needs max_length"):
        processor(text=texts[0], images=[_image(0)], truncation=True)


def test_collator_truncation_through_sft_config_max_length(processors):
    processor = processors["V"]
    examples = _examples()[:1]
    collator = DataCollatorForVisionLanguageModeling(processor, max_length=8)
    with pytest.raises(ValueError, match="would drop"):
        collator(
            copy.deepcopy(
                [
                    {
                        "images": examples[0]["images"],
                        "messages": [{"role": "user", "content": "word " * 20}, {"role": "assistant", "content": "ok"}],
                    }
                ]
            )
        )
    long_answer = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "word " * 200}]
    limit = (
        processor(
            text=processor.apply_chat_template([{"role": "user", "content": "<image>\nHi?"}]),
            images=examples[0]["images"],
        )["input_ids"].shape[1]
        + 5
    )
    batch = DataCollatorForVisionLanguageModeling(processor, max_length=limit)(
        [{"images": examples[0]["images"], "messages": long_answer}]
    )
    assert batch["input_ids"].shape[1] == limit
    assert int((batch["input_ids"] == processor.image_token_id).sum()) == 1


# ---------------------------------------------------------------------------------------------------------------------
# Empty media arguments (item 11)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "empty", [{"videos": None}, {"videos": []}, {"audio": None}, {"audios": []}, {"videos": [[]], "audio": []}]
)
def test_empty_videos_and_audio_are_accepted(processors, empty):
    processor = processors["V"]
    expected = processor(text="<image>\nWhat is it?", images=[_image(0)])
    out = processor(text="<image>\nWhat is it?", images=[_image(0)], **empty)
    assert out["input_ids"].tolist() == expected["input_ids"].tolist()
    assert torch.equal(out["pixel_values"], expected["pixel_values"])


@pytest.mark.parametrize("name", ["videos", "audio", "audios"])
def test_videos_and_audio_with_content_are_refused(processors, name):
    with pytest.raises(ValueError, match=f"images and text only, got {name}"):
        processors["V"](text="What is it?", **{name: [[1.0, 2.0]]})
