"""generate() as transformers users drive it: decoding strategies, returned sequences, logits processors, prompt
lookup and assisted decoding, caches across turns, concurrency. transformers' own generation tests are not in its
source distribution; these cover them for SliME, on both fixture variants."""

from __future__ import annotations

import inspect
import threading
import warnings

import pytest
import torch
from transformers import DynamicCache, GenerationMixin, LlamaConfig, LlamaForCausalLM
from transformers.generation.utils import GenerateDecoderOnlyOutput

import golden_utils as gu
from conftest import VARIANTS
from slime_hf import SliMEConfig, SliMEForConditionalGeneration
from slime_hf.modeling_slime import OUTPUTS_CARRY_IMAGE_OUTPUTS, SliMEImageFeatures, _CandidatesWithoutImageIds


CACHE_FIELD = "cache" if "cache" in GenerateDecoderOnlyOutput.__dataclass_fields__ else "past_key_values"
CACHE_RENAMED = "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
GREEDY = dict(do_sample=False, max_new_tokens=24)


@pytest.fixture(scope="module", params=VARIANTS)
def loaded(request):
    model = SliMEForConditionalGeneration.from_pretrained(gu.checkpoint_dir(request.param), dtype=torch.float32)
    return request.param, model.eval()


def golden_inputs(variant: str, model, name: str) -> tuple[dict, dict]:
    golden = gu.case(variant, name)
    inputs = {"input_ids": gu.golden_ids(golden["input_ids"], model.config.image_token_id)}
    if golden["attention_mask"] is not None:
        inputs["attention_mask"] = torch.tensor(golden["attention_mask"])
    pixel_values, image_sizes = gu.pixel_inputs(golden["images"])
    if pixel_values is not None:
        inputs.update(pixel_values=pixel_values, image_sizes=image_sizes)
    return inputs, golden


def new_ids(out: torch.Tensor, inputs: dict) -> list:
    return out[:, inputs["input_ids"].shape[1] :].tolist()


# -- decoding strategies ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "strategy",
    [
        dict(do_sample=True, num_return_sequences=2, top_k=20),
        dict(do_sample=False, num_beams=3, num_return_sequences=2),
        dict(do_sample=True, num_beams=3, num_return_sequences=2),
    ],
)
def test_several_returned_sequences_each_start_with_their_prompt(loaded, strategy):
    variant, model = loaded
    inputs, _ = golden_inputs(variant, model, "batched_left_pad")
    torch.manual_seed(0)
    out = model.generate(**inputs, max_new_tokens=5, return_dict_in_generate=True, **strategy)
    assert out.sequences.shape[0] == 4
    prompts = inputs["input_ids"].repeat_interleave(2, dim=0)
    assert torch.equal(out.sequences[:, : prompts.shape[1]], prompts)
    assert out.sequences.shape[1] > prompts.shape[1]
    assert len(out.image_token_budget) == 2 and len(out.selected_indices) == 2


def test_sampling_with_top_k_one_and_single_beam_search_equal_greedy(loaded):
    variant, model = loaded
    inputs, golden = golden_inputs(variant, model, "single_3crop")
    assert (
        new_ids(model.generate(**inputs, do_sample=True, top_k=1, max_new_tokens=24), inputs)
        == golden["generated_new_ids"]
    )
    beam = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=24)
    assert new_ids(beam, inputs) == golden["generated_new_ids"]


def test_dict_outputs_carry_scores_logits_hidden_states_and_the_budget(loaded):
    variant, model = loaded
    inputs, golden = golden_inputs(variant, model, "single_3crop")
    out = model.generate(
        **inputs,
        **GREEDY,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
        output_hidden_states=True,
    )
    assert new_ids(out.sequences, inputs) == golden["generated_new_ids"]
    assert len(out.scores) == len(out.logits) == 24
    first_step = out.hidden_states[0]
    assert first_step[-1].shape[1] == golden["inputs_embeds_length"]  # the assembled prompt, not input_ids
    assert [b["local_kept"] for b in out.image_token_budget] == [len(gu.selected(i)) for i in golden["images"]]
    assert [s.tolist() for s in out.selected_indices] == [gu.selected(i) for i in golden["images"]]


def test_no_cache_and_static_cache_equal_the_golden(loaded):
    variant, model = loaded
    inputs, golden = golden_inputs(variant, model, "single_3crop")
    assert new_ids(model.generate(**inputs, **GREEDY, use_cache=False), inputs) == golden["generated_new_ids"]
    static = model.generate(**inputs, **GREEDY, cache_implementation="static")
    assert new_ids(static, inputs) == golden["generated_new_ids"]


def test_max_length_counts_assembled_positions(loaded):
    variant, model = loaded
    inputs, golden = golden_inputs(variant, model, "single_3crop")
    out = model.generate(**inputs, do_sample=False, max_length=golden["inputs_embeds_length"] + 3)
    assert new_ids(out, inputs) == [golden["generated_new_ids"][0][:3]]


# -- the prompt is visible to logits processors, prompt lookup and assistants --------------------------------------
def test_repetition_penalty_sees_the_prompt_text(loaded):
    variant, model = loaded
    inputs, _ = golden_inputs(variant, model, "single_3crop")
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1]
    out = model.generate(
        **inputs,
        do_sample=False,
        max_new_tokens=1,
        repetition_penalty=2.0,
        return_dict_in_generate=True,
        output_scores=True,
    )
    scores = out.scores[0][0]
    ids = inputs["input_ids"][0]
    text_ids = ids[ids != model.config.image_token_id].unique()
    expected = logits.clone()
    chosen = expected[text_ids]
    expected[text_ids] = torch.where(chosen < 0, chosen * 2.0, chosen / 2.0)
    assert torch.allclose(scores, expected, atol=1e-5)
    assert not torch.allclose(scores[text_ids], logits[text_ids])


@pytest.mark.parametrize("name", ["text_only", "single_3crop", "two_images"])
def test_prompt_lookup_equals_greedy_and_never_feeds_the_image_id(loaded, name):
    variant, model = loaded
    inputs, golden = golden_inputs(variant, model, name)
    fed = []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: fed.append(kwargs["input_ids"]), with_kwargs=True
    )
    try:
        out = model.generate(**inputs, **GREEDY, prompt_lookup_num_tokens=3)
    finally:
        hook.remove()
    assert new_ids(out, inputs) == golden["generated_new_ids"]
    # The first forward is the assembled prompt (then maybe candidates); later ones feed generated or candidate
    # tokens only: no candidate is ever the image id.
    prompt_length = golden["inputs_embeds_length"]
    assert fed[0].shape[1] >= prompt_length and len(fed) > 1
    beyond_prompt = [fed[0][:, prompt_length:], *fed[1:]]
    assert all(not bool((ids == model.config.image_token_id).any()) for ids in beyond_prompt)


def test_candidates_stop_before_an_image_id():
    class Proposer:
        def get_candidates(self, input_ids, **kwargs):
            proposal = torch.tensor([[7, 8, 99, 9]])
            return torch.cat([input_ids, proposal], dim=1), torch.zeros(1, 4, 5)

    wrapped = _CandidatesWithoutImageIds(Proposer(), image_token_id=99)
    candidates, logits = wrapped.get_candidates(torch.tensor([[1, 2, 3]]))
    assert candidates.tolist() == [[1, 2, 3, 7, 8]] and logits.shape == (1, 2, 5)


@pytest.mark.parametrize("name", ["text_only", "single_3crop"])
def test_assisted_decoding_with_the_model_as_its_own_assistant_equals_greedy(loaded, name):
    variant, model = loaded
    inputs, golden = golden_inputs(variant, model, name)
    out = model.generate(**inputs, **GREEDY, assistant_model=model)
    assert new_ids(out, inputs) == golden["generated_new_ids"]


def test_a_text_only_assistant_is_refused_with_the_reason(loaded):
    variant, model = loaded
    text = model.config.text_config
    assistant = LlamaForCausalLM(LlamaConfig(**{**text.to_dict(), "num_hidden_layers": 1})).eval()
    inputs, _ = golden_inputs(variant, model, "text_only")
    with pytest.raises(ValueError, match="needs a SliME assistant"):
        model.generate(**inputs, max_new_tokens=2, assistant_model=assistant)


def test_streamer_is_fed_the_callers_prompt(loaded):
    variant, model = loaded
    inputs, golden = golden_inputs(variant, model, "single_3crop")

    class Recorder:
        def __init__(self):
            self.chunks = []
            self.ended = False

        def put(self, value):
            self.chunks.append(value.tolist())

        def end(self):
            self.ended = True

    recorder = Recorder()
    model.generate(**inputs, do_sample=False, max_new_tokens=4, streamer=recorder)
    assert recorder.chunks[0] == inputs["input_ids"].tolist()
    assert [c[0] for c in recorder.chunks[1:]] == golden["generated_new_ids"][0][:4] and recorder.ended


# -- caches across turns --------------------------------------------------------------------------------------------
def _second_turn(model, inputs: dict, answer: torch.Tensor) -> dict:
    follow_up = inputs["input_ids"][:, 1:12]  # more text: the router now reads a longer prompt
    ids = torch.cat([inputs["input_ids"], answer, follow_up[follow_up != model.config.image_token_id][None]], dim=1)
    return dict(inputs, input_ids=ids)


@pytest.mark.parametrize("name", ["single_3crop", "text_only"])
def test_second_turn_with_the_first_turns_cache_equals_a_fresh_run(loaded, name):
    variant, model = loaded
    inputs, _ = golden_inputs(variant, model, name)
    first = model.generate(**inputs, do_sample=False, max_new_tokens=8, return_dict_in_generate=True)
    cache = getattr(first, CACHE_FIELD)
    assert cache.get_seq_length() > 0
    second = _second_turn(model, inputs, first.sequences[:, inputs["input_ids"].shape[1] :])
    fresh = model.generate(**second, do_sample=False, max_new_tokens=8, return_dict_in_generate=True)
    cached = model.generate(
        **second, do_sample=False, max_new_tokens=8, return_dict_in_generate=True, **{CACHE_FIELD: cache}
    )
    assert cached.sequences.tolist() == fresh.sequences.tolist()
    if name == "single_3crop":
        # The longer conversation makes the router keep other local tokens: the cached image block was stale.
        assert first.image_token_budget != fresh.image_token_budget


def test_an_unchanged_prefix_of_a_cache_is_reused(loaded):
    from slime_hf.modeling_slime import _reusable_cache_length

    variant, model = loaded
    inputs, _ = golden_inputs(variant, model, "text_only")
    first = model.generate(**inputs, do_sample=False, max_new_tokens=8, return_dict_in_generate=True)
    cache = getattr(first, CACHE_FIELD)
    second = _second_turn(model, inputs, first.sequences[:, inputs["input_ids"].shape[1] :])
    prepared = model.model.prepare_multimodal_inputs(second["input_ids"], torch.ones_like(second["input_ids"]))
    assert _reusable_cache_length(cache, prepared) == cache.get_seq_length()


# -- concurrency ------------------------------------------------------------------------------------------------------
def test_two_threads_get_their_own_answers_and_budgets(loaded):
    variant, model = loaded
    requests = [golden_inputs(variant, model, name) for name in ("single_3crop", "single_7crop")]
    results: dict[int, list] = {0: [], 1: []}

    def worker(index: int):
        inputs, _ = requests[index]
        for _ in range(3):
            out = model.generate(**inputs, do_sample=False, max_new_tokens=6, return_dict_in_generate=True)
            results[index].append((new_ids(out.sequences, inputs), out.image_token_budget))

    threads = [threading.Thread(target=worker, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, (_inputs, golden) in enumerate(requests):
        expected_ids = [golden["generated_new_ids"][0][:6]]
        expected_kept = [len(gu.selected(i)) for i in golden["images"]]
        assert len(results[index]) == 3
        for ids, budget in results[index]:
            assert ids == expected_ids and [b["local_kept"] for b in budget] == expected_kept
    assert not hasattr(model, "last_image_token_budget") and not hasattr(model, "last_selected_indices")


# -- outputs, image features, inputs ---------------------------------------------------------------------------------
def test_return_dict_false_returns_a_tuple_with_the_logits_first(loaded):
    variant, model = loaded
    inputs, _ = golden_inputs(variant, model, "single_3crop")
    with torch.no_grad():
        reference = model(**inputs).logits
        as_tuple = model(**inputs, return_dict=False)
        assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], reference)
        labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == model.config.image_token_id, -100)
        loss_first = model(**inputs, labels=labels, return_dict=False)
        assert loss_first[0].ndim == 0 and loss_first[1].shape[-1] == reference.shape[-1]
        model.config.return_dict = False
        try:
            from_config = model(**inputs)
        finally:
            model.config.return_dict = True
        assert isinstance(from_config, tuple) and torch.equal(from_config[0], reference)


def test_image_features_without_text_are_the_features_before_routing(loaded):
    variant, model = loaded
    inputs, golden = golden_inputs(variant, model, "single_3crop")
    with torch.no_grad():
        features = model.get_image_features(inputs["pixel_values"], inputs["image_sizes"], output_hidden_states=True)
        routed = model.get_image_features(inputs["pixel_values"], inputs["image_sizes"], inputs["input_ids"])
        as_tuple = model.get_image_features(inputs["pixel_values"], inputs["image_sizes"], return_dict=False)
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    assert isinstance(features, (SliMEImageFeatures, BaseModelOutputWithPooling))
    budget = features.image_token_budget[0]
    assert budget["local_kept"] == budget["local_total"] > routed.image_token_budget[0]["local_kept"]
    assert features.pooler_output[0].shape[0] == budget["total"]
    # Routing keeps a subset of the same tokens: the global block and the kept local tokens are identical.
    kept = routed.selected_indices[0]
    head = budget["global"] + budget["separator"]
    assert torch.equal(routed.pooler_output[0][:head], features.pooler_output[0][:head])
    assert torch.equal(routed.pooler_output[0][head:], features.pooler_output[0][head:][kept])
    assert len(features.hidden_states) == model.config.vision_config.num_hidden_layers + 1
    assert routed.hidden_states is None
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], features.last_hidden_state)


def test_forward_output_carries_image_outputs_where_transformers_has_the_field(loaded):
    variant, model = loaded
    inputs, _ = golden_inputs(variant, model, "single_3crop")
    with torch.no_grad():
        out = model(**inputs)
    assert ("image_outputs" in out.__dataclass_fields__) == OUTPUTS_CARRY_IMAGE_OUTPUTS
    if OUTPUTS_CARRY_IMAGE_OUTPUTS:
        assert [b.shape[0] for b in out.image_outputs.pooler_output] == [b["total"] for b in out.image_token_budget]


def test_past_key_values_argument_warns_where_in_tree_models_do(loaded):
    variant, model = loaded
    inputs, _ = golden_inputs(variant, model, "text_only")
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        out = model(**inputs, past_key_values=DynamicCache(), use_cache=True)
    assert getattr(out, CACHE_FIELD).get_seq_length() == inputs["input_ids"].shape[1]
    renamed = [w for w in caught if "past_key_values" in str(w.message)]
    assert bool(renamed) == CACHE_RENAMED


def test_tied_embeddings_shard_lm_head_with_embed_tokens(loaded):
    _, model = loaded
    config = SliMEConfig.from_dict(model.config.to_dict())
    config.tie_word_embeddings = True
    config.text_config.tie_word_embeddings = True
    tied = SliMEForConditionalGeneration(config)
    assert tied.lm_head.weight is tied.model.language_model.embed_tokens.weight
    plan = tied._tp_plan
    assert plan["lm_head"] == "colwise_gather_output"
    assert plan["model.language_model.embed_tokens"] == "embedding_rowwise"


def test_image_sizes_with_fewer_views_than_given_are_an_error(loaded):
    variant, model = loaded
    inputs, _ = golden_inputs(variant, model, "single_7crop")
    wrong = dict(inputs, image_sizes=torch.tensor([[336, 336]]))
    with pytest.raises(ValueError, match="non-padding views"):
        model.generate(**wrong, max_new_tokens=2)
    with pytest.raises(ValueError, match="non-padding views"):
        model(**wrong)


def test_a_prompt_too_long_for_any_routing_is_refused_before_encoding(loaded):
    variant, model = loaded
    inputs, _ = golden_inputs(variant, model, "single_3crop")
    limit = model.config.text_config.max_position_embeddings
    filler = inputs["input_ids"][:, 1:2].repeat(1, limit)
    long_ids = torch.cat([inputs["input_ids"], filler], dim=1)
    calls = []
    hook = model.model.vision_tower.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match="max_position_embeddings"):
            model.generate(**dict(inputs, input_ids=long_ids), max_new_tokens=2)
    finally:
        hook.remove()
    assert calls == []


# -- batched generation -------------------------------------------------------------------------------------------
def _batch_of_cases(variant: str, model, names: tuple[str, ...]) -> tuple[dict, list[dict]]:
    goldens = [gu.case(variant, name) for name in names]
    rows = [gu.golden_ids(g["input_ids"], model.config.image_token_id)[0] for g in goldens]
    input_ids, attention_mask = gu.left_pad(rows, gu.cases(variant)["pad_token_id"])
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    pixel_values, image_sizes = gu.pixel_inputs([image for g in goldens for image in g["images"]])
    if pixel_values is not None:
        inputs.update(pixel_values=pixel_values, image_sizes=image_sizes)
    return inputs, goldens


@pytest.mark.parametrize("prefill_rows_separately", [None, False], ids=["rows-prefilled-separately", "padded-prefill"])
@pytest.mark.parametrize(
    "names, router_top_p",
    [
        (("text_only", "single_3crop", "single_7crop", "tall_extreme", "two_images"), None),
        (("top_p_0.5", "text_only"), 0.5),  # the text-only row's golden does not depend on the router
    ],
    ids=["every-default-case", "router-top-p-0.5"],
)
def test_batched_rows_equal_their_single_goldens(loaded, names, router_top_p, prefill_rows_separately):
    """Every golden case in one left-padded batch, both prefill modes: each row's greedy ids, first-step logits and
    kept indices are its single run's."""
    variant, model = loaded
    inputs, goldens = _batch_of_cases(variant, model, names)
    prefills = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: prefills.append(kwargs["inputs_embeds"].shape[:2]), with_kwargs=True
    )
    try:
        out = model.generate(
            **inputs,
            **GREEDY,
            router_top_p=router_top_p,
            prefill_rows_separately=prefill_rows_separately,
            return_dict_in_generate=True,
            output_logits=True,
        )
    finally:
        hook.remove()
    if prefill_rows_separately is None:  # one prefill per row, without padding, then one batched step per token
        lengths = sorted(g["inputs_embeds_length"] - 1 for g in goldens)
        assert sorted(shape[1] for shape in prefills[: len(goldens)]) == lengths
        assert all(shape[0] == 1 for shape in prefills[: len(goldens)])
        assert prefills[len(goldens)] == (len(goldens), 1)
    else:
        assert prefills[0] == (len(goldens), max(g["inputs_embeds_length"] for g in goldens))
    images = [image for g in goldens for image in g["images"]]
    assert [s.tolist() for s in out.selected_indices] == [gu.selected(image) for image in images]
    for row, golden in enumerate(goldens):
        assert out.sequences[row, inputs["input_ids"].shape[1] :].tolist() == golden["generated_new_ids"][0]
        reference = gu.tensor(variant, golden["logits_last_ref"])[0]
        assert (out.logits[0][row] - reference).abs().max().item() <= 1e-4


def test_rows_prefilled_separately_only_where_decoding_allows(loaded):
    variant, model = loaded
    inputs, goldens = _batch_of_cases(variant, model, ("single_3crop", "text_only"))
    with pytest.raises(ValueError, match="one sequence per prompt"):
        model.generate(**inputs, num_beams=2, max_new_tokens=2, prefill_rows_separately=True)
    beams = model.generate(**inputs, num_beams=2, num_return_sequences=1, max_new_tokens=3, do_sample=False)
    assert beams.shape[0] == 2  # the padded batch is prefilled instead


def test_growing_cache_layer_holds_what_a_dynamic_layer_holds():
    """Prefill, steps past its spare room, crop and rewrite, batch selection: the same keys and values as transformers'
    concatenating layer, while steps within the spare room write into the same buffer."""
    from transformers.cache_utils import DynamicLayer

    from slime_hf.modeling_slime import SliMEGrowingCacheLayer

    torch.manual_seed(0)
    growing, plain = SliMEGrowingCacheLayer(), DynamicLayer()

    def update(length: int, batch: int = 3):
        keys, values = torch.randn(batch, 2, length, 4), torch.randn(batch, 2, length, 4)
        got, expected = growing.update(keys, values), plain.update(keys, values)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
        assert growing.get_seq_length() == plain.get_seq_length()

    update(300)
    buffer = growing.keys.data_ptr()
    for _ in range(70):  # 300 positions get room for 75 more (a quarter)
        update(1)
    assert growing.keys.data_ptr() == buffer
    for _ in range(10):
        update(1)
    assert growing.keys.data_ptr() != buffer  # grown once, the contents kept
    growing.crop(-5)
    plain.crop(-5)
    update(2)
    indices = torch.tensor([2, 0])
    growing.batch_select_indices(indices)
    plain.batch_select_indices(indices)
    update(1, batch=2)
    growing.reset()
    assert growing.get_seq_length() == 0


def test_generate_decodes_from_a_growing_cache_where_it_supplies_the_cache(loaded):
    from slime_hf.modeling_slime import SliMEGrowingCacheLayer

    variant, model = loaded
    inputs, golden = golden_inputs(variant, model, "single_3crop")
    out = model.generate(**inputs, **GREEDY, return_dict_in_generate=True)
    assert new_ids(out.sequences, inputs) == golden["generated_new_ids"]
    assert all(isinstance(layer, SliMEGrowingCacheLayer) for layer in getattr(out, CACHE_FIELD).layers)
    beams = model.generate(**inputs, num_beams=2, max_new_tokens=2, return_dict_in_generate=True)
    assert not any(isinstance(layer, SliMEGrowingCacheLayer) for layer in getattr(beams, CACHE_FIELD).layers)
