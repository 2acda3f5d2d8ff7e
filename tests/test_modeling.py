"""SliMEForConditionalGeneration against the goldens of the authors' code (both fixture variants, float32)."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open

import golden_utils as gu
from slime_hf import SliMEForConditionalGeneration


VARIANTS = ("V", "L")
IMAGE_CASES = ("single_3crop", "single_7crop", "tall_extreme", "two_images", "top_p_0.5")
ALL_SINGLE_CASES = IMAGE_CASES + ("text_only",)
FEATURE_TOL = 1e-5
TENSOR_TOL = 1e-4


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(scope="module")
def original_models():
    """The fixtures' checkpoints in the authors' layout, loaded directly."""
    torch.manual_seed(0)
    return {
        v: SliMEForConditionalGeneration.from_pretrained(gu.checkpoint_dir(v), dtype=torch.float32).eval()
        for v in VARIANTS
    }


@pytest.fixture(scope="module")
def reloaded_models(original_models, tmp_path_factory):
    """The same models after save_pretrained -> from_pretrained."""
    out = {}
    for variant, model in original_models.items():
        folder = tmp_path_factory.mktemp(f"saved_{variant}")
        model.save_pretrained(folder)
        out[variant] = SliMEForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    return out


@pytest.fixture(params=[(v, s) for v in VARIANTS for s in ("original", "reloaded")], ids=lambda p: f"{p[0]}-{p[1]}")
def model_and_variant(request, original_models, reloaded_models):
    variant, source = request.param
    models = original_models if source == "original" else reloaded_models
    return models[variant], variant


def _inputs(model, variant: str, golden: dict) -> dict:
    pixel_values, image_sizes = gu.pixel_inputs(golden["images"])
    return {
        "input_ids": gu.golden_ids(golden["input_ids"], model.config.image_token_id),
        "pixel_values": pixel_values,
        "image_sizes": image_sizes,
        "router_top_p": golden["top_p"],
    }


@pytest.mark.parametrize("name", IMAGE_CASES)
def test_vision_path_matches_goldens(model_and_variant, name):
    model, variant = model_and_variant
    golden = gu.case(variant, name)
    inputs = _inputs(model, variant, golden)
    inner = model.model
    with torch.no_grad():
        features = inner.get_image_features(
            inputs["pixel_values"], inputs["image_sizes"], inputs["input_ids"], router_top_p=golden["top_p"]
        )
    for index, image in enumerate(golden["images"]):
        refs = gu._json(image["tensors"])
        pixels = inputs["pixel_values"][index, : image["crops"]]
        with torch.no_grad():
            vision = inner.encode_views(pixels)
        if refs.get("vision_features"):
            assert _max_diff(vision, gu.tensor(variant, refs["vision_features"])) <= FEATURE_TOL
        assert _max_diff(vision.mean(1), gu.tensor(variant, refs["vision_features_mean"])) <= FEATURE_TOL
        if refs.get("global_out"):
            assert _max_diff(features.global_tokens[index], gu.tensor(variant, refs["global_out"])) <= TENSOR_TOL
            with torch.no_grad():
                gates = inner.global_adapter.gates(vision[0])
            assert _max_diff(gates, gu.tensor(variant, refs["gates"])) <= TENSOR_TOL
        if refs.get("local_compressed"):
            with torch.no_grad():
                compressed = inner.projector(inner.local_compressor(vision[1:]))
            assert _max_diff(compressed, gu.tensor(variant, refs["local_compressed"])) <= TENSOR_TOL
            assert _max_diff(features.local_tokens[index], gu.tensor(variant, refs["local_merged"])) <= TENSOR_TOL
        if refs.get("separator_embedding"):
            separator = features.image_features[index][576]
            assert _max_diff(separator, gu.tensor(variant, refs["separator_embedding"])) <= TENSOR_TOL
        if refs.get("router_scores"):
            assert _max_diff(features.router_scores[index], gu.tensor(variant, refs["router_scores"])) <= TENSOR_TOL
        assert features.selected_indices[index].tolist() == gu.selected(image)
        if refs.get("image_features"):
            assert _max_diff(features.image_features[index], gu.tensor(variant, refs["image_features"])) <= TENSOR_TOL
        budget = features.image_token_budget[index]
        assert budget == image["token_budget"]


@pytest.mark.parametrize("name", ALL_SINGLE_CASES)
def test_logits_and_greedy_match_goldens(model_and_variant, name):
    model, variant = model_and_variant
    golden = gu.case(variant, name)
    inputs = _inputs(model, variant, golden)
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits.shape[1] == golden["inputs_embeds_length"]
    assert _max_diff(out.logits[:, -1], gu.tensor(variant, golden["logits_last_ref"])) <= TENSOR_TOL
    if golden.get("logits_text_ref"):
        positions = gu.tensor(variant, golden["logits_text_positions_ref"])
        reference = gu.tensor(variant, golden["logits_text_ref"])
        assert _max_diff(out.logits[0, positions], reference) <= TENSOR_TOL
    generated = model.generate(**inputs, do_sample=False, max_new_tokens=24)
    prompt_length = inputs["input_ids"].shape[1]
    assert torch.equal(generated[:, :prompt_length], inputs["input_ids"])
    assert generated[:, prompt_length:].tolist() == golden["generated_new_ids"]


def test_batched_left_pad_equals_singles(model_and_variant):
    model, variant = model_and_variant
    golden = gu.case(variant, "batched_left_pad")
    singles = gu.singles(golden)
    rows = [gu.golden_ids(s["input_ids"], model.config.image_token_id)[0] for s in singles]
    input_ids, attention_mask = gu.left_pad(rows, gu.cases(variant)["pad_token_id"])
    pixel_values, image_sizes = gu.pixel_inputs(golden["images"])
    inputs = dict(
        input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, image_sizes=image_sizes
    )
    with torch.no_grad():
        out = model(**inputs)
    for row, single in enumerate(singles):
        assert out.selected_indices[row].tolist() == gu.selected(single["images"][0])
        reference = gu.tensor(variant, single["logits_last_ref"])
        assert _max_diff(out.logits[row, -1], reference[0]) <= TENSOR_TOL
    generated = model.generate(**inputs, do_sample=False, max_new_tokens=24)
    for row, single in enumerate(singles):
        assert generated[row, input_ids.shape[1] :].tolist() == single["generated_ids"][0][1:]


def test_mixed_batch_reproduces_every_row(model_and_variant):
    """Text-only, 3-crop, 7-crop and two-image prompts in one batch: each row equals its own golden."""
    model, variant = model_and_variant
    names = ("text_only", "single_3crop", "single_7crop", "two_images")
    goldens = [gu.case(variant, n) for n in names]
    rows = [gu.golden_ids(g["input_ids"], model.config.image_token_id)[0] for g in goldens]
    input_ids, attention_mask = gu.left_pad(rows, gu.cases(variant)["pad_token_id"])
    images = [image for g in goldens for image in g["images"]]
    pixel_values, image_sizes = gu.pixel_inputs(images)
    inputs = dict(
        input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, image_sizes=image_sizes
    )

    routed_rows = []
    original = model.model._text_for_routing

    def recording(input_ids_, attention_mask_, labels_, row, *rest):
        routed_rows.append(row)
        return original(input_ids_, attention_mask_, labels_, row, *rest)

    model.model._text_for_routing = recording
    try:
        with torch.no_grad():
            out = model(**inputs)
    finally:
        del model.model._text_for_routing
    # each image routed against its own sample's text: images of two_images both against row 3
    assert routed_rows == [1, 2, 3]

    image_index = 0
    for row, golden in enumerate(goldens):
        for image in golden["images"]:
            assert out.selected_indices[image_index].tolist() == gu.selected(image)
            image_index += 1
        assert _max_diff(out.logits[row, -1], gu.tensor(variant, golden["logits_last_ref"])[0]) <= TENSOR_TOL
    generated = model.generate(**inputs, do_sample=False, max_new_tokens=24)
    for row, golden in enumerate(goldens):
        assert generated[row, input_ids.shape[1] :].tolist() == golden["generated_new_ids"][0]


def test_router_top_p_per_call_and_budget(original_models):
    model = original_models["V"]
    golden = gu.case("V", "single_7crop")
    inputs = _inputs(model, "V", golden)
    inputs.pop("router_top_p")
    with torch.no_grad():
        default = model(**inputs)
        narrow = model(**inputs, router_top_p=0.5)
    assert default.image_token_budget[0]["local_kept"] == 698  # config value 0.95
    assert narrow.selected_indices[0].tolist() == gu.selected(gu.case("V", "top_p_0.5")["images"][0])
    assert narrow.image_token_budget[0] == {
        "global": 576,
        "separator": 1,
        "local_kept": 191,
        "local_total": 864,
        "total": 768,
    }


@pytest.mark.parametrize("switch", ["use_global_only", "use_local_only"])
def test_stage_switches_change_what_the_llm_sees(original_models, switch):
    model = copy.deepcopy(original_models["V"])
    setattr(model.config, switch, True)
    golden = gu.case("V", "single_3crop")
    inputs = _inputs(model, "V", golden)
    with torch.no_grad():
        out = model(**inputs)
    budget = out.image_token_budget[0]
    assert budget["separator"] == 0
    if switch == "use_global_only":
        assert budget["total"] == budget["global"] == 576 and budget["local_kept"] == 0
    else:
        assert budget["global"] == 0 and budget["total"] == budget["local_kept"] == 258
    text_positions = inputs["input_ids"].shape[1] - 1
    assert out.logits.shape[1] == text_positions + budget["total"]


def test_saved_folder_holds_only_package_names(original_models, tmp_path):
    model = original_models["V"]
    model.save_pretrained(tmp_path)
    names, dtypes = set(), {}
    for shard in tmp_path.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as handle:
            for key in handle.keys():
                names.add(key)
                dtypes[key] = handle.get_slice(key).get_dtype()
    package_prefixes = (
        "model.vision_tower.",
        "model.projector.",
        "model.global_adapter.",
        "model.local_compressor.",
        "model.language_model.",
        "lm_head.",
    )
    assert len(names) == len(model.state_dict())
    assert all(name.startswith(package_prefixes) for name in names), sorted(names)
    for forbidden in ("mm_projector", "sampler", "post_qformer", "vision_tower.vision_tower"):
        assert not any(forbidden in n for n in names), forbidden
    assert not any(n.startswith(("model.layers.", "model.embed_tokens.", "model.norm.")) for n in names)
    assert dtypes["model.local_compressor.position_table"] == "F16"
    assert dtypes["model.global_adapter.attention_expert.position_table"] == "F16"
    for code_file in (
        "configuration_slime.py",
        "modeling_slime.py",
        "image_processing_slime.py",
        "processing_slime.py",
        "tokenization_slime.py",
    ):
        assert (tmp_path / code_file).is_file()
    config = (tmp_path / "config.json").read_text()
    assert '"AutoModel": "modeling_slime.SliMEForConditionalGeneration"' in config


# -------------------------------------------------------------------------------------------------------------
# Bad input
# -------------------------------------------------------------------------------------------------------------
def test_placeholder_count_mismatch_is_an_error(original_models):
    model = original_models["V"]
    golden = gu.case("V", "two_images")
    inputs = _inputs(model, "V", golden)
    one_image = dict(inputs, pixel_values=inputs["pixel_values"][:1], image_sizes=inputs["image_sizes"][:1])
    with pytest.raises(ValueError, match="2 image placeholders but 1 images"):
        model(**one_image)
    with pytest.raises(ValueError, match="2 image placeholders but 1 images"):
        model.generate(**one_image, max_new_tokens=2)
    with pytest.raises(ValueError, match="no pixel_values"):
        model(input_ids=inputs["input_ids"])


def test_sequence_over_the_limit_is_an_error(original_models):
    model = original_models["V"]
    golden = gu.case("V", "single_7crop")
    inputs = _inputs(model, "V", golden)
    limit = model.config.text_config.max_position_embeddings
    model.config.text_config.max_position_embeddings = 1000
    try:
        with pytest.raises(ValueError, match="1371 positions.*371 more than.*max_position_embeddings=1000"):
            model(**inputs)
    finally:
        model.config.text_config.max_position_embeddings = limit


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda i: dict(i, pixel_values=i["pixel_values"].long()), "floating-point"),
        (lambda i: dict(i, pixel_values=i["pixel_values"][:, :, :, :300]), "shape"),
        (lambda i: dict(i, image_sizes=i["image_sizes"].float()), "integer tensor"),
        (lambda i: dict(i, image_sizes=i["image_sizes"][:, :1]), "integer tensor"),
        (lambda i: dict(i, image_sizes=None), "image_sizes"),
        (lambda i: dict(i, pixel_values=i["pixel_values"][:, :2]), "needs 7 views"),
        (lambda i: dict(i, router_top_p=1.5), "router_top_p"),
    ],
)
def test_malformed_image_inputs_are_errors(original_models, change, message):
    model = original_models["V"]
    inputs = _inputs(model, "V", gu.case("V", "single_7crop"))
    with pytest.raises(ValueError, match=message):
        model(**change(inputs))


def test_from_pretrained_names_a_broken_or_foreign_config(tmp_path):
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(ValueError, match=r"config\.json is not a readable JSON config"):
        SliMEForConditionalGeneration.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="model_type 'llama', not a SliME model"):
        SliMEForConditionalGeneration.from_pretrained(tmp_path)
