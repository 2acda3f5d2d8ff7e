"""lmms-eval end to end through `slime_hf` on the V and L fixtures.

`python -m lmms_eval --model slime_hf` over the mini benchmarks (the package's task variants on local data) gives the
answers of a direct `generate` on the same prompts, log-likelihoods equal to the model's forward with the context's
routing, per-sample token budgets, and scores."""

from __future__ import annotations

import json
import math

import pytest
import torch
from mini_benchmarks import GQA_ROWS, MMBENCH_ROWS, MME_ROWS, TEXTVQA_ROWS, doc_images, read_results, read_samples

from conftest import CHOICE_TASK, GENERATE_TASKS, MAX_NEW_TOKENS
from slime_hf.evaluation.prompting import render_prompt


VARIANTS = ("V", "L")
SAMPLES = {"mini_textvqa": TEXTVQA_ROWS, "mini_gqa": GQA_ROWS, "mini_mme": MME_ROWS, "mini_mmbench_en": MMBENCH_ROWS}
CHOICES = lambda doc_id: [TEXTVQA_ROWS[doc_id]["answers"][0], "blue", "nothing at all"]  # noqa: E731 (as ll_utils)


def budget_records(output) -> list[dict]:
    return [json.loads(line) for line in (output / "budget.jsonl").read_text().splitlines()]


def direct_answer(model, processor, context: str, images: list):
    prompt = render_prompt(processor, context, len(images))
    inputs = processor(images=images, text=prompt, return_tensors="pt")
    output = model.generate(
        **inputs,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        max_new_tokens=MAX_NEW_TOKENS,
        return_dict_in_generate=True,
    )
    new_ids = output.sequences[:, inputs["input_ids"].shape[1] :]
    return processor.batch_decode(new_ids, skip_special_tokens=True)[0], output.image_token_budget


@pytest.mark.parametrize("variant", VARIANTS)
def test_answers_equal_direct_generate(variant, lmms_eval_run, loaded):
    output = lmms_eval_run(variant)
    model, processor = loaded(variant)
    budgets = {(r["task"], r["doc_id"]): r["images"] for r in budget_records(output) if r["task"] != CHOICE_TASK}
    assert len(budgets) == sum(len(rows) for rows in SAMPLES.values())
    for task in GENERATE_TASKS:
        samples = read_samples(output, task)
        assert sorted(s["doc_id"] for s in samples) == list(range(len(SAMPLES[task])))
        for sample in samples:
            images = doc_images(task, sample["doc_id"])
            answer, budget = direct_answer(model, processor, sample["input"], images)
            # `resps` is the model's answer, logged where lmms-eval's filters (whitespace strip) changed it
            assert sample.get("resps", sample["filtered_resps"]) == answer, (task, sample["doc_id"])
            assert budgets[(task, sample["doc_id"])] == budget, (task, sample["doc_id"])
            assert all(0 < image["local_kept"] <= image["local_total"] for image in budget)


@pytest.mark.parametrize("variant", VARIANTS)
def test_loglikelihood_equals_forward_with_context_routing(variant, lmms_eval_run, loaded):
    output = lmms_eval_run(variant)
    model, processor = loaded(variant)
    samples = read_samples(output, CHOICE_TASK)
    assert sorted(s["doc_id"] for s in samples) == list(range(len(TEXTVQA_ROWS)))
    for sample in samples:
        images = doc_images(CHOICE_TASK, sample["doc_id"])
        prompt = render_prompt(processor, sample["input"], len(images))
        context = processor(images=images, text=prompt, return_tensors="pt")
        with torch.no_grad():
            # routing on the context alone, as when answering it; the continuation's embeddings follow
            prepared = model.model.prepare_multimodal_inputs(
                context["input_ids"], context["attention_mask"], context["pixel_values"], context["image_sizes"]
            )
        for choice, (logprob, greedy) in zip(CHOICES(sample["doc_id"]), sample["filtered_resps"]):
            full = processor(images=images, text=prompt + " " + choice, return_tensors="pt")["input_ids"][0]
            prefix = context["input_ids"].shape[1]
            assert torch.equal(full[:prefix], context["input_ids"][0])
            continuation = full[prefix:]
            embeds = torch.cat([prepared.inputs_embeds, model.get_input_embeddings()(continuation)[None]], dim=1)
            with torch.no_grad():
                mask = torch.ones(embeds.shape[:2], dtype=torch.long)
                logits = model(inputs_embeds=embeds, attention_mask=mask).logits
            scores = torch.log_softmax(logits[0, prepared.inputs_embeds.shape[1] - 1 : -1].double(), dim=-1)
            expected = float(scores.gather(-1, continuation[:, None]).sum())
            assert abs(float(logprob) - expected) <= 1e-5, (sample["doc_id"], choice, float(logprob), expected)
            assert (str(greedy) == "True") == bool((scores.argmax(-1) == continuation).all())


@pytest.mark.parametrize("variant", VARIANTS)
def test_scorers_run(variant, lmms_eval_run):
    output = lmms_eval_run(variant)
    results = read_results(output)["results"]
    for task, metric in (("mini_textvqa", "exact_match"), ("mini_gqa", "exact_match")):
        per_sample = [s[metric] for s in read_samples(output, task)]
        assert results[task][f"{metric},none"] == pytest.approx(sum(per_sample) / len(per_sample))
    for metric in ("mme_perception_score", "mme_cognition_score"):
        assert math.isfinite(results["mini_mme"][f"{metric},none"])
    assert 0 <= results["mini_mmbench_en"]["accuracy,none"] <= 100
    # the official files: TextVQA's submission, MMBench's evaluation-server upload
    submissions = {path.name for path in (output / "submissions").iterdir()}
    assert "mmbench_en_dev_upload.xlsx" in submissions
    assert any(name.startswith("textvqa_submission") for name in submissions)
    assert results[CHOICE_TASK]["acc,none"] in (0.0, 1 / 3, 2 / 3, 1.0)
