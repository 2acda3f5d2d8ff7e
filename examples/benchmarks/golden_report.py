"""Fidelity and LLM work per golden case: max differences against the authors' code and positions the LLM
processes (text + 577 + kept local tokens per image), for both fixture variants.

    python examples/benchmarks/golden_report.py [--fixtures tests/fixtures/reference]
"""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from slime_hf import SliMEForConditionalGeneration


def _value(raw):
    if not isinstance(raw, str):
        return raw
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return ast.literal_eval(raw)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixtures", default="tests/fixtures/reference")
    args = parser.parse_args()
    root = Path(args.fixtures)
    torch.set_num_threads(1)
    rows = []
    for variant in ("V", "L"):
        goldens = json.loads((root / variant / "model_goldens" / "cases.json").read_text())
        model = SliMEForConditionalGeneration.from_pretrained(root / variant / "checkpoint", dtype=torch.float32)
        model.eval()

        def tensor(ref):
            name, key = ref.split("::")
            return load_file(str(root / variant / "model_goldens" / name))[key]

        for case in goldens["cases"]:
            if case["name"] == "batched_left_pad":
                continue
            ids = torch.tensor(_value(case["input_ids"]))
            ids[ids == -200] = model.config.image_token_id
            pixel_values = sizes = None
            if case["images"]:
                arrays = []
                for image in case["images"]:
                    name, key = image["pixel_values"].split("::")
                    arrays.append(np.load(root / name)[key])
                pixel_values = torch.zeros(len(arrays), max(len(a) for a in arrays), 3, 336, 336)
                for i, array in enumerate(arrays):
                    pixel_values[i, : len(array)] = torch.from_numpy(array)
                sizes = torch.tensor([[h, w] for w, h in case["image_sizes"]])
            with torch.no_grad():
                out = model(input_ids=ids, pixel_values=pixel_values, image_sizes=sizes, router_top_p=case["top_p"])
                features = (
                    model.get_image_features(pixel_values, sizes, ids, router_top_p=case["top_p"])
                    if case["images"]
                    else None
                )
            generated = model.generate(
                input_ids=ids,
                pixel_values=pixel_values,
                image_sizes=sizes,
                router_top_p=case["top_p"],
                do_sample=False,
                max_new_tokens=24,
            )
            diffs = {"logits_last": (out.logits[:, -1] - tensor(case["logits_last_ref"])).abs().max().item()}
            if case.get("logits_text_ref"):
                positions = tensor(case["logits_text_positions_ref"])
                diffs["logits_text"] = (out.logits[0, positions] - tensor(case["logits_text_ref"])).abs().max().item()
            same_indices = True
            for i, image in enumerate(case["images"]):
                refs = _value(image["tensors"])
                for name, ours in (
                    ("global_out", features.global_tokens[i]),
                    ("local_merged", features.local_tokens[i]),
                    ("router_scores", features.router_scores[i]),
                    ("image_features", features.image_features[i]),
                ):
                    if refs.get(name):
                        diff = (ours - tensor(refs[name])).abs().max().item()
                        diffs[name] = max(diffs.get(name, 0.0), diff)
                same_indices &= out.selected_indices[i].tolist() == _value(image["selected_indices"])
            text_positions = ids.shape[1] - len(case["images"])
            kept = sum(b["local_kept"] for b in (out.image_token_budget or []))
            total_local = sum(b["local_total"] for b in (out.image_token_budget or []))
            rows.append(
                (
                    variant,
                    case["name"],
                    text_positions,
                    577 * len(case["images"]),
                    kept,
                    total_local,
                    out.logits.shape[1],
                    same_indices,
                    generated[0, ids.shape[1] :].tolist() == case["generated_new_ids"][0],
                    diffs,
                )
            )

    print(
        "| variant | case | text | global+sep | local kept / total | LLM positions | kept indices equal | "
        "greedy equal | max abs diff |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for variant, name, text, glob, kept, total, positions, same, greedy, diffs in rows:
        diff_text = ", ".join(f"{k} {v:.1e}" for k, v in diffs.items())
        print(
            f"| {variant} | {name} | {text} | {glob} | {kept} / {total} | {positions} | {same} | {greedy} | "
            f"{diff_text} |"
        )


if __name__ == "__main__":
    main()
