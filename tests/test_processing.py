"""SliMEProcessor: exact prompt tokenization, chat templates, padding, errors, save / reload."""

from __future__ import annotations

import json
import os
import pickle
import textwrap

import pytest
import torch
from PIL import Image

from conftest import FIXTURES, VARIANTS
from helpers import python_env, run_python
from slime_hf.processing_slime import (
    CHAT_TEMPLATES,
    IMAGE_TOKEN,
    SentencePieceLlamaEncoder,
    SliMEProcessor,
    default_chat_template_name,
    tokenize_prompt_with_images,
)


ORIGINAL_IMAGE_ID = -200
VOCAB = {"V": 1000, "L": 1024}
from golden_utils import _json  # noqa: E402


PAD = {"V": ("<unk>", 0), "L": ("<|end_of_text|>", 1009)}
BOS = {"V": 1, "L": 1008}
# Golden entries marked `template: llama3` are the original's inference prompts.
PARITY_TEMPLATE = {"vicuna_v1": "vicuna_v1", "llama3": "llama3_original", "plain": "plain"}
PROMPTS = json.loads((FIXTURES / "prompts.json").read_text())
PROMPT_IDS = [entry["name"] for entry in PROMPTS]


def _prompt(value):
    """A case's `prompt`: a string, a list of strings, or a JSON-encoded list (batched case)."""
    if isinstance(value, str) and value.startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _to_original(ids, image_token_id: int) -> list[int]:
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    return [ORIGINAL_IMAGE_ID if i == image_token_id else i for i in ids]


def _messages(entry: dict) -> tuple[list[dict], bool]:
    """prompts.json `messages` (user, assistant, ..., None = generation prompt) as chat messages."""
    roles = ("user", "assistant")
    messages = [{"role": roles[i % 2], "content": m} for i, m in enumerate(entry["messages"]) if m is not None]
    return messages, entry["messages"][-1] is None


def _images(count: int) -> list[Image.Image]:
    # Prompt ids do not depend on pixels: small images keep the image processor fast.
    return [Image.new("RGB", (40 + 7 * i, 30 + 5 * i), (10 * i, 80, 160)) for i in range(count)]


@pytest.fixture(scope="module")
def processors() -> dict[str, SliMEProcessor]:
    return {variant: SliMEProcessor.from_pretrained(FIXTURES / variant / "checkpoint") for variant in VARIANTS}


# ---------------------------------------------------------------------------------------------------------------------
# Exact tokenization
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("index", range(len(PROMPTS)), ids=PROMPT_IDS)
def test_tokenize_function_matches_goldens(processors, variant, index):
    entry = PROMPTS[index]
    processor = processors[variant]
    ids = tokenize_prompt_with_images(processor.prompt_encoder, entry["text"], processor.image_token_id)
    assert _to_original(ids, processor.image_token_id) == entry["ids"][variant]
    assert ids[0] == BOS[variant] and ids.count(processor.image_token_id) == entry["text"].count(IMAGE_TOKEN)
    assert processor.tokenize_prompt(entry["text"]) == ids


def test_exact_path_is_used_for_sentencepiece_only(processors):
    assert processors["V"].uses_exact_sentencepiece
    assert isinstance(processors["V"].prompt_encoder, SentencePieceLlamaEncoder)
    assert processors["V"].sentencepiece_legacy is False
    assert not processors["L"].uses_exact_sentencepiece
    assert processors["L"].prompt_encoder is processors["L"].tokenizer


def test_sentencepiece_encoder_special_strings_and_corners(processors):
    encoder = processors["V"].prompt_encoder
    # Special-token strings typed in the text become their ids; empty text is BOS only.
    assert encoder.encode("") == [1]
    assert encoder.encode("", add_special_tokens=False) == []
    ids = encoder.encode("a </s> b <s> c <unk>")
    assert ids[0] == 1 and {0, 1, 2} <= set(ids[1:])
    assert encoder.encode("</s>")[:2] == [1, 2]  # no "▁" kept before a leading special token
    # A chunk starting with a space keeps its "▁" (the transformers 5 tokenizer does not on these chunks).
    assert encoder.tokenize(" and")[0].startswith("\u2581")


def test_tokens_added_later_are_split_out():
    processor = SliMEProcessor.from_pretrained(FIXTURES / "V" / "checkpoint")
    processor.tokenizer.add_special_tokens({"extra_special_tokens": ["<extra>"]}, replace_extra_special_tokens=False)
    extra_id = processor.tokenizer.convert_tokens_to_ids("<extra>")
    assert extra_id == VOCAB["V"] + 1
    assert extra_id in processor.tokenize_prompt("a <extra> b <image>")


def test_sentencepiece_encoder_pickles(processors):
    processor = processors["V"]
    text = PROMPTS[0]["text"]
    clone = pickle.loads(pickle.dumps(processor))
    assert clone.uses_exact_sentencepiece
    assert clone.tokenize_prompt(text) == processor.tokenize_prompt(text)


# ---------------------------------------------------------------------------------------------------------------------
# Templates + processor on prompts.json
# ---------------------------------------------------------------------------------------------------------------------


# `plain_preprocess` entries are training renderings ("<image>" + caption + "\n"), covered by the tokenization test.
CHAT_ENTRIES = [i for i, entry in enumerate(PROMPTS) if entry["how"] != "plain_preprocess"]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("index", CHAT_ENTRIES, ids=[PROMPT_IDS[i] for i in CHAT_ENTRIES])
def test_template_and_processor_match_goldens(processors, variant, index):
    entry = PROMPTS[index]
    processor = processors[variant]
    messages, add_generation_prompt = _messages(entry)
    template = CHAT_TEMPLATES[PARITY_TEMPLATE[entry["template"]]]
    text = processor.apply_chat_template(messages, chat_template=template, add_generation_prompt=add_generation_prompt)
    assert text == entry["text"]

    num_images = text.count(IMAGE_TOKEN)
    if num_images == 0 and not text.strip():
        with pytest.raises(ValueError, match="empty"):
            processor(text=text)
        return
    inputs = processor(text=text, images=_images(num_images) or None)
    assert _to_original(inputs["input_ids"][0], processor.image_token_id) == entry["ids"][variant]
    assert inputs["attention_mask"].tolist() == [[1] * len(entry["ids"][variant])]
    assert (inputs["input_ids"] == processor.image_token_id).sum() == num_images
    if num_images:
        assert inputs["pixel_values"].shape[0] == num_images
        assert inputs["pixel_values"].shape[2:] == (3, 336, 336)
        assert inputs["image_sizes"].tolist() == [[im.height, im.width] for im in _images(num_images)]
    else:
        assert "pixel_values" not in inputs


@pytest.mark.parametrize("variant", VARIANTS)
def test_model_golden_prompts(processors, variant):
    processor = processors[variant]
    cases = json.loads((FIXTURES / variant / "model_goldens" / "cases.json").read_text())["cases"]
    assert cases
    for case in cases:
        prompts = _prompt(case["prompt"])
        golden = _json(case["input_ids"])
        if isinstance(prompts, str):
            ids = processor.tokenize_prompt(prompts)
            assert [_to_original(ids, processor.image_token_id)] == golden, case["name"]
            continue
        # batched_left_pad: the batch, left padded with the pad id, and each prompt alone.
        counts = [p.count(IMAGE_TOKEN) for p in prompts]
        inputs = processor(text=prompts, images=_images(sum(counts)))
        rows = [_to_original(row, processor.image_token_id) for row in inputs["input_ids"]]
        assert rows == golden, case["name"]
        if case.get("attention_mask") is not None:
            assert inputs["attention_mask"].tolist() == _json(case["attention_mask"])
        for prompt, single in zip(prompts, case["singles"]):
            ids = processor.tokenize_prompt(prompt)
            assert [_to_original(ids, processor.image_token_id)] == _json(single["input_ids"])


# ---------------------------------------------------------------------------------------------------------------------
# Image token, pad token, template choice
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_image_and_pad_tokens(processors, variant):
    processor = processors[variant]
    tokenizer = processor.tokenizer
    assert processor.image_token == "<image>"
    assert processor.image_token_id == VOCAB[variant]
    assert tokenizer.convert_tokens_to_ids("<image>") == VOCAB[variant]
    assert len(tokenizer) == VOCAB[variant] + 1
    assert "<pad>" not in tokenizer.get_vocab()
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == PAD[variant]
    # Decoding skips the image token like any special token.
    assert IMAGE_TOKEN not in processor.decode([processor.image_token_id, 300], skip_special_tokens=True)


def test_default_templates(processors):
    assert default_chat_template_name(processors["V"].tokenizer) == "vicuna_v1"
    assert default_chat_template_name(processors["L"].tokenizer) == "llama3"
    assert processors["V"].chat_template["default"] == CHAT_TEMPLATES["vicuna_v1"]
    assert processors["L"].chat_template["default"] == CHAT_TEMPLATES["llama3"]
    assert set(processors["V"].chat_template) == {"default", "vicuna_v1", "plain"}
    assert set(processors["L"].chat_template) == {"default", "llama3", "llama3_original", "plain"}
    plain = SliMEProcessor.from_pretrained(FIXTURES / "V" / "checkpoint", chat_template_name="plain")
    assert plain.chat_template["default"] == CHAT_TEMPLATES["plain"]
    messages = [{"role": "user", "content": "<image>\nWhat is this?"}]
    assert plain.apply_chat_template(messages, add_generation_prompt=True) == "<image>\nWhat is this?\n"
    with pytest.raises(ValueError, match="Unknown SliME chat template"):
        SliMEProcessor.from_pretrained(FIXTURES / "V" / "checkpoint", chat_template_name="chatml")


def test_llama3_training_template_has_no_fake_separator(processors):
    entry = next(e for e in PROMPTS if e["name"] == "llama3/multi_turn")
    messages, _ = _messages(entry)
    text = processors["L"].apply_chat_template(messages, add_generation_prompt=True)
    assert text == entry["text"].replace("<|eot_conversation|>", "")
    answer = messages + [{"role": "assistant", "content": "Blue."}]
    text = processors["L"].apply_chat_template(answer, chat_template="llama3")
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\nBlue.<|eot_id|>")
    text = processors["V"].apply_chat_template(answer[:1] + answer[1:2], chat_template="vicuna_v1")
    assert text.endswith(" ASSISTANT: A red circle and some text.</s>")


def test_plain_template_refuses_assistant_turns(processors):
    messages = [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "A caption."}]
    with pytest.raises(Exception, match="plain template renders user messages only"):
        processors["V"].apply_chat_template(messages, chat_template="plain")


# ---------------------------------------------------------------------------------------------------------------------
# Content items and apply_chat_template(tokenize=True)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_chat_template_with_image_content_items(processors, variant):
    processor = processors[variant]
    template = "vicuna_v1" if variant == "V" else "llama3_original"
    by_name = {e["name"]: e for e in PROMPTS}
    prefix = "vicuna_v1" if variant == "V" else "llama3"
    image = _images(1)[0]
    cases = {
        "image_start": [{"type": "image", "image": image}, {"type": "text", "text": "What is shown in this image?"}],
        "image_only": [{"type": "image", "image": image}],
        "two_images": [
            {"type": "image", "image": image},
            {"type": "image", "image": image},
            {"type": "text", "text": "Compare the two images."},
        ],
        "image_end": [
            {"type": "text", "text": "What is in the following image?\n"},
            {"type": "image", "image": image},
        ],
    }
    for name, content in cases.items():
        entry = by_name[f"{prefix}/{name}"]
        messages = [{"role": "user", "content": content}]
        text = processor.apply_chat_template(messages, chat_template=template, add_generation_prompt=True)
        assert text == entry["text"], name
        inputs = processor.apply_chat_template(
            messages, chat_template=template, add_generation_prompt=True, tokenize=True, return_dict=True
        )
        assert _to_original(inputs["input_ids"][0], processor.image_token_id) == entry["ids"][variant], name
        assert inputs["pixel_values"].shape[0] == text.count(IMAGE_TOKEN)
        assert inputs["image_sizes"].tolist() == [[image.height, image.width]] * text.count(IMAGE_TOKEN)


def test_chat_template_batch_of_conversations(processors):
    processor = processors["V"]
    image = _images(1)[0]
    conversations = [
        [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Hi?"}]}],
        [{"role": "user", "content": [{"type": "text", "text": "Write a long poem about the sea, please."}]}],
    ]
    inputs = processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert inputs["input_ids"].shape[0] == 2
    assert inputs["pixel_values"].shape[0] == 1
    assert (inputs["input_ids"][0] == processor.image_token_id).sum() == 1
    assert (inputs["input_ids"][1] == processor.image_token_id).sum() == 0


# ---------------------------------------------------------------------------------------------------------------------
# Padding, image bookkeeping and errors
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_left_and_right_padding(processors, variant):
    processor = processors[variant]
    pad_id = PAD[variant][1]
    texts = ["<image>\nWhat is this picture about, in many words?", "Hi <image>"]
    singles = [processor.tokenize_prompt(t) for t in texts]
    width = max(map(len, singles))
    left = processor(text=texts, images=_images(2))
    right = processor(text=texts, images=_images(2), padding_side="right")
    assert left["input_ids"].shape == right["input_ids"].shape == (2, width)
    assert left["input_ids"].dtype == torch.long
    for row, ids in enumerate(singles):
        pad = width - len(ids)
        assert left["input_ids"][row].tolist() == [pad_id] * pad + ids
        assert left["attention_mask"][row].tolist() == [0] * pad + [1] * len(ids)
        assert right["input_ids"][row].tolist() == ids + [pad_id] * pad
        assert right["attention_mask"][row].tolist() == [1] * len(ids) + [0] * pad
    assert left["input_ids"][1, 0].item() == pad_id and left["input_ids"][1, -1].item() != pad_id
    # Lists without padding; padding to a multiple.
    unpadded = processor(text=texts, images=_images(2), padding=False, return_tensors=None)
    assert unpadded["input_ids"] == singles
    multiple = processor(text=texts, images=_images(2), pad_to_multiple_of=64)
    assert multiple["input_ids"].shape[1] % 64 == 0


def test_images_flat_or_nested(processors):
    processor = processors["V"]
    texts = ["<image> and <image>: which?", "Text only, no picture.", "<image>"]
    images = _images(3)
    flat = processor(text=texts, images=images)
    nested = processor(text=texts, images=[images[:2], [], images[2:]])
    assert torch.equal(flat["input_ids"], nested["input_ids"])
    assert torch.equal(flat["pixel_values"], nested["pixel_values"])
    assert flat["image_sizes"].tolist() == [[im.height, im.width] for im in images]
    assert flat["image_sizes"].dtype == torch.int64
    assert flat["pixel_values"].dtype == torch.float32
    # Several placeholders in one prompt: one image token each.
    assert (flat["input_ids"][0] == processor.image_token_id).sum() == 2


def test_errors(processors):
    processor = processors["V"]
    with pytest.raises(ValueError, match=r"2 <image> placeholder\(s\) but 1 image"):
        processor(text="<image> and <image>", images=_images(1))
    with pytest.raises(ValueError, match=r"1 <image> placeholder\(s\) but 0 image"):
        processor(text="<image> what is it?")
    with pytest.raises(ValueError, match=r"0 <image> placeholder\(s\) but 1 image"):
        processor(text="What is it?", images=_images(1))
    with pytest.raises(ValueError, match=r"Sample 1 has 1 <image> placeholder\(s\) but 0 image"):
        processor(text=["<image> a", "<image> b"], images=[_images(1), []])
    for empty in ("", "   ", "\n\t "):
        with pytest.raises(ValueError, match="empty"):
            processor(text=empty)
    with pytest.raises(ValueError, match="Prompt 1 is empty"):
        processor(text=["fine", " "])
    with pytest.raises(ValueError, match="padding_side"):
        processor(text="hello", padding_side="middle")
    with pytest.raises(ValueError, match="truncation=True needs max_length"):
        processor(text="hello", truncation=True)
    # An image alone is a valid prompt.
    assert processor(text="<image>", images=_images(1))["input_ids"].tolist() == [[1, processor.image_token_id]]


def test_image_options_and_images_only(processors):
    processor = processors["L"]
    images = _images(2)
    text_and_images = processor(text="<image><image>", images=images)
    # Flat image processor options are routed to it; unknown options are refused.
    threaded = processor(text="<image><image>", images=images, num_threads=1)
    assert torch.equal(threaded["pixel_values"], text_and_images["pixel_values"])
    with pytest.raises(TypeError, match="unexpected keyword"):
        processor(text="hello", not_an_option=3)
    # Images alone (flat or nested) give pixels only.
    only = processor(images=[images[:1], images[1:]])
    assert set(only) == {"pixel_values", "image_sizes"}
    assert torch.equal(only["pixel_values"], text_and_images["pixel_values"])
    # Nested kwargs as ProcessorMixin passes them.
    nested = processor(text=["a", "a b c"], text_kwargs={"padding_side": "right"}, return_tensors=None)
    assert nested["attention_mask"][0][-1] == 0


def test_constructed_from_a_tokenizer_and_torch_backend():
    from transformers import LlamaTokenizer

    from slime_hf.image_processing_slime import SliMEImageProcessor, SliMEImageProcessorPil

    tokenizer = LlamaTokenizer.from_pretrained(FIXTURES / "V" / "checkpoint")
    processor = SliMEProcessor(tokenizer=tokenizer)
    assert isinstance(processor.image_processor, SliMEImageProcessorPil)
    assert processor.uses_exact_sentencepiece and processor.image_token_id == VOCAB["V"]
    for entry in PROMPTS:
        assert _to_original(processor.tokenize_prompt(entry["text"]), processor.image_token_id) == entry["ids"]["V"]
    # The same tokenizer object again: <image> is not added twice.
    assert SliMEProcessor(tokenizer=tokenizer).image_token_id == VOCAB["V"] and len(tokenizer) == VOCAB["V"] + 1
    torch_backend = SliMEProcessor.from_pretrained(FIXTURES / "L" / "checkpoint", backend="torch")
    assert isinstance(torch_backend.image_processor, SliMEImageProcessor)
    with pytest.raises(ValueError, match="backend"):
        SliMEProcessor.from_pretrained(FIXTURES / "L" / "checkpoint", backend="tensorflow")


def test_vicuna_system_message(processors):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
    ]
    text = processors["V"].apply_chat_template(messages, add_generation_prompt=True)
    assert text == "You are terse. USER: <image>\nWhat? ASSISTANT:"


# ---------------------------------------------------------------------------------------------------------------------
# Save / reload in a fresh interpreter
# ---------------------------------------------------------------------------------------------------------------------

_RELOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from transformers import AutoProcessor

    how, fixtures, pairs = sys.argv[1], sys.argv[2], sys.argv[3:]
    if how == "class":
        from slime_hf.processing_slime import SliMEProcessor
    prompts = json.load(open(fixtures + "/prompts.json"))
    parity = {"vicuna_v1": "vicuna_v1", "llama3": "llama3_original", "plain": "plain"}
    results = {}
    for variant, folder in zip(pairs[::2], pairs[1::2]):
        if how == "auto":
            # Remote code only: nothing of the package is imported in this interpreter.
            processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
            assert "slime_hf" not in sys.modules
        else:
            processor = SliMEProcessor.from_pretrained(folder)
        templates = sys.modules[type(processor).__module__].CHAT_TEMPLATES
        image_id = processor.image_token_id
        failures = []
        for entry in prompts:
            ids = [-200 if i == image_id else i for i in processor.tokenize_prompt(entry["text"])]
            if ids != entry["ids"][variant]:
                failures.append(("ids", entry["name"]))
            if entry["how"] != "plain_preprocess":
                messages = [
                    {"role": ("user", "assistant")[i % 2], "content": m}
                    for i, m in enumerate(entry["messages"]) if m is not None
                ]
                text = processor.apply_chat_template(
                    messages,
                    chat_template=templates[parity[entry["template"]]],
                    add_generation_prompt=entry["messages"][-1] is None,
                )
                if text != entry["text"]:
                    failures.append(("text", entry["name"]))
        tokenizer = processor.tokenizer
        results[variant] = {
            "failures": failures,
            "image_token_id": image_id,
            "len": len(tokenizer),
            "pad": [tokenizer.pad_token, tokenizer.pad_token_id],
            "has_pad_piece": "<pad>" in tokenizer.get_vocab(),
            "exact": processor.uses_exact_sentencepiece,
            "default_template": processor.chat_template["default"],
            "templates": sorted(processor.chat_template),
            "image_processor": type(processor.image_processor).__name__,
        }
    print(json.dumps(results))
    """
)


def _reload(how: str, folders: dict, tmp_path) -> dict:
    """Reloads saved folders in a fresh interpreter: by class (`how="class"`) or by remote code (`"auto"`)."""
    env = python_env(how == "class", modules_cache=tmp_path / "hf_modules", TRANSFORMERS_VERBOSITY="error")
    pairs = [str(item) for variant, folder in folders.items() for item in (variant, folder)]
    result = run_python("-c", _RELOAD_SCRIPT, how, str(FIXTURES), *pairs, cwd=tmp_path, env=env)
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_save_and_reload_in_fresh_process(processors, tmp_path):
    folders = {variant: tmp_path / f"saved_{variant}" for variant in VARIANTS}
    for variant, folder in folders.items():
        processors[variant].save_pretrained(folder)
        files = set(os.listdir(folder))
        assert {"tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja"} <= files
        assert ("tokenizer.model" in files) == (variant == "V")
        config = json.loads((folder / "processor_config.json").read_text())
        assert config["processor_class"] == "SliMEProcessor"
        assert config["image_token"] == "<image>"
        assert config["sentencepiece_legacy"] is (False if variant == "V" else None)
        if SliMEProcessor._auto_class is not None:
            assert config["auto_map"]["AutoProcessor"] == "processing_slime.SliMEProcessor"
            assert {"processing_slime.py", "tokenization_slime.py", "image_processing_slime.py"} <= files

    hows = ["class", "auto"] if SliMEProcessor._auto_class is not None else ["class"]
    for how in hows:
        results = _reload(how, folders, tmp_path)
        for variant in VARIANTS:
            reloaded, processor = results[variant], processors[variant]
            assert reloaded["failures"] == [], (how, variant)
            assert reloaded["image_token_id"] == VOCAB[variant]
            assert reloaded["len"] == VOCAB[variant] + 1
            assert reloaded["pad"] == list(PAD[variant])
            assert reloaded["has_pad_piece"] is False
            assert reloaded["exact"] is (variant == "V")
            assert reloaded["default_template"] == processor.chat_template["default"]
            assert reloaded["templates"] == sorted(processor.chat_template)
            assert reloaded["image_processor"] == type(processor.image_processor).__name__


@pytest.mark.parametrize("variant", VARIANTS)
def test_save_and_reload_in_process(processors, variant, tmp_path):
    processor = processors[variant]
    processor.save_pretrained(tmp_path / "first")
    again = SliMEProcessor.from_pretrained(tmp_path / "first")
    again.save_pretrained(tmp_path / "second")
    # Saving a reloaded processor keeps tokenizer.model (the exact path), the templates and the ids.
    assert ("tokenizer.model" in os.listdir(tmp_path / "second")) == (variant == "V")
    assert again.chat_template == processor.chat_template
    third = SliMEProcessor.from_pretrained(tmp_path / "second", chat_template_name="plain")
    assert third.chat_template["default"] == CHAT_TEMPLATES["plain"]
    for entry in PROMPTS:
        assert third.tokenize_prompt(entry["text"]) == processor.tokenize_prompt(entry["text"]), entry["name"]


def test_call_defaults_and_kwargs_merging(processors):
    from slime_hf.processing_slime import SliMEProcessorKwargs

    processor = processors["V"]
    defaults = json.dumps(SliMEProcessorKwargs._defaults, sort_keys=True)
    texts = ["a", "a b c"]
    side = processor.tokenizer.padding_side
    try:
        # The processor's defaults (left padding, tensors) whatever the tokenizer's own padding side.
        processor.tokenizer.padding_side = "right"
        out = processor(text=texts)
        assert isinstance(out["input_ids"], torch.Tensor) and out["attention_mask"][0].tolist()[0] == 0
    finally:
        processor.tokenizer.padding_side = side
    # common_kwargs apply to one call only (transformers 5.17 would write them into class-level defaults).
    as_numpy = processor(text=texts, common_kwargs={"return_tensors": "np"})
    assert type(as_numpy["input_ids"]).__module__ == "numpy"
    assert isinstance(processor(text=texts)["input_ids"], torch.Tensor)
    assert json.dumps(SliMEProcessorKwargs._defaults, sort_keys=True) == defaults
    # One option twice (flat and nested) is refused, as transformers' `_merge_kwargs` does.
    with pytest.raises(ValueError, match="padding was passed two times"):
        processor(text=texts, padding="longest", text_kwargs={"padding": False})
    with pytest.raises(TypeError, match="unexpected keyword.*text_kwargs"):
        processor(text="hello", text_kwargs={"not_an_option": 1})
    with pytest.raises(ValueError, match="max_length must be a positive integer"):
        processor(text="hello", max_length=0)


def test_from_pretrained_passes_component_options():
    processor = SliMEProcessor.from_pretrained(
        FIXTURES / "V" / "checkpoint", cls_token="<cls>", do_normalize=False, dtype=torch.float16, device_map="cpu"
    )
    assert processor.tokenizer.cls_token == "<cls>" and processor.image_processor.do_normalize is False
    # The model's loading kwargs that `pipeline` passes along are not tokenizer options.
    assert "dtype" not in processor.tokenizer.init_kwargs and "device_map" not in processor.tokenizer.init_kwargs


def test_replaced_chat_template_is_what_is_saved(tmp_path):
    processor = SliMEProcessor.from_pretrained(FIXTURES / "V" / "checkpoint")
    processor.save_pretrained(tmp_path / "named")
    reloaded = SliMEProcessor.from_pretrained(tmp_path / "named")
    assert reloaded.tokenizer.chat_template == processor.chat_template  # the tokenizer loads the folder's templates
    reloaded.chat_template = CHAT_TEMPLATES["plain"]
    reloaded.save_pretrained(tmp_path / "single")
    # The tokenizer's named templates (from the first folder) are not written again.
    assert not (tmp_path / "single" / "additional_chat_templates").exists()
    assert SliMEProcessor.from_pretrained(tmp_path / "single").chat_template == CHAT_TEMPLATES["plain"]
    assert reloaded.tokenizer.chat_template == processor.chat_template  # saving leaves the tokenizer as it was
