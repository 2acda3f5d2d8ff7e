"""The `slime_hf` lmms-eval model's options, in process on the V fixture: batching, `until`, greedy versus sampling,
`router_top_p`, `dtype`, `device_map`, and clear errors for bad options."""

from __future__ import annotations

import pytest
import torch
from lmms_eval.api.instance import Instance
from mini_benchmarks import TEXTVQA_ROWS, image

from conftest import checkpoint
from slime_hf.evaluation.model import SliMELmms
from slime_hf.evaluation.prompting import render_prompt


TASK, SPLIT = "options", "test"
DOCS = [{"image": image(row["image"]), "question": row["question"]} for row in TEXTVQA_ROWS]
GREEDY = {"max_new_tokens": 10, "temperature": 0, "do_sample": False, "until": []}


def make_lm(**options) -> SliMELmms:
    lm = SliMELmms(pretrained=str(checkpoint("V")), **options)
    lm.task_dict = {TASK: {SPLIT: DOCS}}
    return lm


def requests(gen_kwargs: dict, count: int = len(DOCS)) -> list[Instance]:
    return [
        Instance(
            request_type="generate_until",
            arguments=(DOCS[i]["question"], dict(gen_kwargs), lambda doc: [doc["image"]], i, TASK, SPLIT),
            idx=0,
            metadata={"task": TASK, "doc_id": i, "repeats": 1},
        )
        for i in range(count)
    ]


@pytest.fixture(scope="module")
def lm() -> SliMELmms:
    return make_lm(batch_size=2)


def test_batches_equal_single_prompts(lm):
    batched = lm.generate_until(requests(GREEDY))
    lm.batch_size_per_process = 1
    try:
        single = lm.generate_until(requests(GREEDY))
    finally:
        lm.batch_size_per_process = 2
    assert batched == single
    assert len(set(batched)) > 1  # answers come back in request order, not in the batches' order


def test_text_only_samples_batch_with_image_samples(lm):
    mixed = requests(GREEDY, 2)
    text_only = Instance(
        request_type="generate_until",
        arguments=("Write one word.", dict(GREEDY), lambda doc: [], 2, TASK, SPLIT),
        idx=0,
        metadata={"task": TASK, "doc_id": 2, "repeats": 1},
    )
    lm.budget_records.clear()
    batched = lm.generate_until([mixed[0], text_only, mixed[1]])
    assert [len(record["images"]) for record in sorted(lm.budget_records, key=lambda r: r["doc_id"])] == [1, 1, 0]
    singles = [lm.generate_until([request])[0] for request in (mixed[0], text_only, mixed[1])]
    assert batched == singles


def test_until_cuts_the_answer(lm):
    (answer,) = lm.generate_until(requests(GREEDY, 1))
    stop = answer[3:5]
    assert len(stop) == 2
    (cut,) = lm.generate_until(requests({**GREEDY, "until": [stop, "never in the answer"]}, 1))
    assert cut == answer[: answer.index(stop)]


def test_greedy_unless_the_task_samples(lm):
    kwargs, until = lm._generation_kwargs({"temperature": 0, "top_p": 1.0, "max_new_tokens": 5, "until": "\n"})
    assert kwargs["do_sample"] is False and until == ["\n"]
    assert kwargs["temperature"] is None and kwargs["top_p"] is None  # the release config's sampling settings unset
    kwargs, _ = lm._generation_kwargs({"temperature": 0.7, "top_p": 0.9})
    assert kwargs["do_sample"] is True and kwargs["temperature"] == 0.7 and kwargs["top_p"] == 0.9
    kwargs, _ = lm._generation_kwargs({"do_sample": True})
    assert kwargs["do_sample"] is True and kwargs["temperature"] == 1.0
    with pytest.raises(ValueError, match="until"):
        lm._generation_kwargs({"until": 3})


def test_router_top_p_reaches_the_router(lm):
    lm.budget_records.clear()
    lm.generate_until(requests(GREEDY, 1))
    (default,) = lm.budget_records[-1]["images"]
    narrow = make_lm(router_top_p=0.3)
    narrow.generate_until(requests(GREEDY, 1))
    (kept,) = narrow.budget_records[-1]["images"]
    prompt = render_prompt(narrow.processor, DOCS[0]["question"], 1)
    inputs = narrow.processor(images=[DOCS[0]["image"]], text=prompt, return_tensors="pt")
    direct = narrow.model.generate(
        **inputs, router_top_p=0.3, do_sample=False, max_new_tokens=1, return_dict_in_generate=True
    )
    assert [kept] == direct.image_token_budget
    assert kept["local_kept"] < default["local_kept"]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dtype(dtype):
    lm = make_lm(dtype=dtype, device_map="cpu")
    # the language model runs in the requested dtype (float16 keeps the vision side in float32, as the model declares)
    assert lm.model.get_input_embeddings().weight.dtype == getattr(torch, dtype)
    (answer,) = lm.generate_until(requests({**GREEDY, "max_new_tokens": 3}, 1))
    assert isinstance(answer, str)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"dtype": "int8"}, "dtype must be one of"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"batch_size": "two"}, "batch_size must be a positive integer"),
        ({"router_top_p": 1.5}, r"router_top_p must be in \(0, 1\]"),
        ({"router_top_p": "high"}, r"router_top_p must be in \(0, 1\], got 'high'"),
        ({"temperature": 0.2}, r"unknown model_args \['temperature'\]"),
    ],
)
def test_bad_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        make_lm(**options)


def test_empty_continuation_is_refused(lm):
    prompt = render_prompt(lm.processor, DOCS[0]["question"], 1)
    with pytest.raises(ValueError, match="has no tokens"):
        lm.continuation_logprobs(prompt, "", [DOCS[0]["image"]])
