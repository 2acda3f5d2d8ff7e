"""The converted repo as a user without `slime_hf` loads it: through the Auto classes with `trust_remote_code=True`,
in a process where the package cannot be imported.

    python remote_check.py FOLDER IMAGE PROMPT NEW_TOKENS DEVICE OUT_PATH

The converter runs this file by path (it imports nothing from `slime_hf`), and calls [`verification_outputs`] on its
own reference model too, so that both sides compute exactly the same thing.
"""

from __future__ import annotations

import sys
from typing import Any


class HidePackage:
    """A meta-path finder that makes `slime_hf` unimportable, even where it is installed."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == "slime_hf" or name.startswith("slime_hf."):
            raise ImportError("slime_hf is hidden: the repo must load from its own code files")
        return None


def hide_package() -> None:
    """Makes `slime_hf` unimportable in this process from now on."""
    sys.meta_path.insert(0, HidePackage())


def verification_outputs(
    model: Any, processor: Any, image_path: str, prompt: str, new_tokens: int, device: str
) -> dict:
    """Token ids and pixel values of a one-image chat prompt, the last-position logits and the greedy new ids."""
    import torch
    from PIL import Image

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[Image.open(image_path)], text=text, return_tensors="pt")
    on_device = {key: value.to(device) for key, value in inputs.items()}
    with torch.no_grad():
        logits = model(**on_device).logits[:, -1].float().cpu()
    generated = model.generate(**on_device, do_sample=False, max_new_tokens=new_tokens)
    return {
        "input_ids": inputs["input_ids"],
        "pixel_values": inputs["pixel_values"],
        "logits_last": logits,
        "new_ids": generated[:, inputs["input_ids"].shape[1] :].cpu(),
    }


def main(argv: list[str]) -> None:
    """Loads FOLDER with `slime_hf` hidden and saves [`verification_outputs`] of it to OUT_PATH."""
    hide_package()
    try:
        import slime_hf  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("slime_hf must not be importable in the verification process")
    import torch
    from transformers import AutoModel, AutoProcessor

    folder, image_path, prompt, new_tokens, device, out_path = argv[:6]
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype="auto").to(device).eval()
    torch.save(verification_outputs(model, processor, image_path, prompt, int(new_tokens), device), out_path)


if __name__ == "__main__":
    main(sys.argv[1:])
