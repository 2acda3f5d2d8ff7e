"""transformers' own common tests (`ModelTesterMixin`, `ConfigTester`, `ProcessorTesterMixin`) on a tiny SliME.

The common testers come from the source distribution of the INSTALLED transformers version, downloaded with pip into
a cache outside the repository when this module is collected (tests/transformers_sources.py). Without a reachable
registry the module fails to collect, loudly.

The tiny SliME: a 2-layer Llama (vocabulary 99, so `<image>` is id 99, out of vocabulary: Decision 3), a 2-layer CLIP
tower on 28 px views with 14 px patches (a 2x2 patch grid, so 4 global queries), 4 local compressor queries, and
images of 28 x 56 px (grid 1 x 2 under the 336 px grid rule and under a 28 px tile alike: 3 views). With
`router_top_p=1.0` every local token is kept, so each `<image>` becomes 4 global + 1 separator + 8 local tokens and
every assembled row has the same length (the common tests compare batch rows with single runs).

Every skip and override below states its SliME-specific reason. Tests marked `PENDING-MODELING-FIX` fail because of
a bug in slime_hf/modeling_slime.py; they are expected failures only until that file is fixed.
"""

from __future__ import annotations

import copy
import unittest

import torch

import transformers_sources


COMMON = transformers_sources.load_common_tests()  # raises (collection error) when the sdist cannot be downloaded
ModelTesterMixin = COMMON.modeling.ModelTesterMixin
ConfigTester = COMMON.configuration.ConfigTester
ProcessorTesterMixin = COMMON.processing.ProcessorTesterMixin
floats_tensor = COMMON.modeling.floats_tensor
ids_tensor = COMMON.modeling.ids_tensor

from transformers import AutoTokenizer  # noqa: E402

from slime_hf import (  # noqa: E402
    SliMEConfig,
    SliMEForConditionalGeneration,
    SliMEImageProcessorPil,
    SliMEModel,
    SliMEProcessor,
)
from slime_hf.demo import DEMO_TOKENIZER  # noqa: E402


class SliMEModelTester:
    # 7 rows: the eager-vs-SDPA test runs 7 rows and would pad a smaller batch with random rows (no `<image>` in
    # their ids but images in their pixel_values).
    def __init__(self, parent, batch_size: int = 7, text_length: int = 7):
        self.parent = parent
        self.batch_size = batch_size
        self.text_length = text_length
        self.vocab_size = 99
        self.hidden_size = 32
        self.num_hidden_layers = 2
        self.num_attention_heads = 4
        self.is_training = True
        self.image_size = 28
        self.patch_size = 14
        self.image_hw = (28, 56)  # grid (1, 2) whether the grid rule tiles in 336 px or in 28 px units
        self.max_views = 3
        self.local_queries = 4
        global_tokens = (self.image_size // self.patch_size) ** 2
        # The LLM sees the assembled sequence: the text without its `<image>`, plus global, separator, local tokens.
        self.seq_length = text_length - 1 + global_tokens + 1 + 2 * self.local_queries
        self.text_config = {
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": 37,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": 2,
            "max_position_embeddings": 128,
            "hidden_act": "silu",
            "initializer_range": 0.02,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
        }
        self.vision_config = {
            "model_type": "clip_vision_model",
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "num_channels": 3,
            "hidden_size": 32,
            "intermediate_size": 37,
            "projection_dim": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "hidden_act": "quick_gelu",
            "initializer_range": 0.02,
        }

    def get_config(self) -> SliMEConfig:
        return SliMEConfig(
            text_config=copy.deepcopy(self.text_config),
            vision_config=copy.deepcopy(self.vision_config),
            image_token_id=self.vocab_size,
            separator_token_id=3,
            local_compressor_num_queries=self.local_queries,
            resampler_head_dim=16,
            router_top_p=1.0,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )

    def prepare_config_and_inputs(self):
        config = self.get_config()
        pixel_values = floats_tensor([self.batch_size, self.max_views, 3, self.image_size, self.image_size])
        return config, pixel_values

    def prepare_config_and_inputs_for_common(self):
        config, pixel_values = self.prepare_config_and_inputs()
        input_ids = ids_tensor([self.batch_size, self.text_length], self.vocab_size - 4) + 4
        # One image per sample, away from the two positions the eager-vs-SDPA test pads on either side.
        input_ids[:, 2] = config.image_token_id
        inputs_dict = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "pixel_values": pixel_values,
            "image_sizes": torch.tensor([list(self.image_hw)] * self.batch_size),
        }
        return config, inputs_dict


class SliMEModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (SliMEModel, SliMEForConditionalGeneration)
    # SliME's `generate` is its own (vision path once, compacted embeddings; Decision 12) and is tested in
    # tests/test_modeling.py; transformers' GenerationTesterMixin is not in the source distribution either.
    all_generative_model_classes = ()
    _is_composite = True
    test_resize_embeddings = False  # Decision 3: embeddings are never resized (`<image>` stays out of vocabulary)
    test_torch_exportable = False  # per-image top-p routing is data-dependent Python control flow

    additional_model_inputs = ["pixel_values", "image_sizes"]
    # `get_image_features(...).last_hidden_state` holds every real view of the batch (an image has 1 global view and
    # 2-7 local crops, ragged across images), not one row per image.
    skip_test_image_features_output_shape = True

    def setUp(self):
        self.model_tester = SliMEModelTester(self)
        self.config_tester = ConfigTester(self, config_class=SliMEConfig, has_text_modality=False)

    def test_config(self):
        self.config_tester.run_common_tests()

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
        # transformers adds labels for the model types of its own Auto mappings only; SliME's head takes causal-LM
        # labels aligned with input_ids (image positions ignored).
        if return_labels and model_class is SliMEForConditionalGeneration and "input_ids" in inputs_dict:
            ids = inputs_dict["input_ids"]
            inputs_dict["labels"] = ids.masked_fill(ids == self.model_tester.get_config().image_token_id, -100)
        return inputs_dict

    # transformers recognises base models (no loss, skipped by the training tests) by `MODEL_MAPPING_NAMES`, where
    # SliME is absent and `AutoModel` maps to the class with the head (Decision 2): run them on the head class only.
    def _head_class_only(self):
        self.all_model_classes = (SliMEForConditionalGeneration,)

    def test_training(self):
        self._head_class_only()
        super().test_training()

    def test_keep_in_fp32_modules(self):
        """transformers' rule (a float16 load keeps `_keep_in_fp32_modules` in float32, a bfloat16 load casts
        everything), with one SliME-specific exception: the resamplers' sin-cos position tables keep the dtype they
        are rounded to (float16 for the authors' checkpoints, as the original builds them) whatever the load dtype,
        or the local tokens move by ~2e-4 (the same check without the tables is transformers' own)."""
        import re
        import tempfile

        config, _inputs = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            with self.subTest(model_class.__name__), tempfile.TemporaryDirectory() as folder:
                model = model_class(copy.deepcopy(config))
                keep = set(model._keep_in_fp32_modules) | set(model._keep_in_fp32_modules_strict or ())
                self.assertTrue(keep)
                model.save_pretrained(folder)
                for load_dtype in (torch.float16, torch.bfloat16):
                    loaded = model_class.from_pretrained(folder, dtype=load_dtype)
                    upcast = keep if load_dtype == torch.float16 else set(loaded._keep_in_fp32_modules_strict or ())
                    for name, param in loaded.state_dict().items():
                        if not param.is_floating_point():
                            continue
                        if name.endswith("position_table"):
                            table_dtype = getattr(torch, config.position_table_dtype)
                            expected = (
                                torch.float32
                                if any(re.search(rf"(?:^|\.){k}(?:\.|$)", name) for k in upcast)
                                else table_dtype
                            )
                            self.assertIn(param.dtype, {expected, table_dtype}, name)
                        elif any(re.search(rf"(?:^|\.){k}(?:\.|$)", name) for k in upcast):
                            self.assertEqual(param.dtype, torch.float32, f"{name} not upcasted to fp32")
                        else:
                            self.assertEqual(param.dtype, load_dtype, f"{name} was upcasted but it should NOT be")

    _FROZEN_TOWER = (
        "the CLIP tower is frozen (run under no_grad), so the first checkpointed layer the test instruments (a CLIP "
        "encoder layer) is never checkpointed; the text model's checkpointing is tested in tests/test_modeling.py"
    )

    @unittest.skip(_FROZEN_TOWER)
    def test_training_gradient_checkpointing(self):
        pass

    @unittest.skip(_FROZEN_TOWER)
    def test_training_gradient_checkpointing_use_reentrant_false(self):
        pass

    @unittest.skip(_FROZEN_TOWER)
    def test_training_gradient_checkpointing_use_reentrant_true(self):
        pass

    @unittest.skip("embeds input_ids itself: the `<image>` id is out of the vocabulary (Decision 3), no embedding row")
    def test_inputs_embeds(self):
        pass


class SliMEProcessorTest(ProcessorTesterMixin, unittest.TestCase):
    processor_class = SliMEProcessor

    @classmethod
    def _setup_image_processor(cls):
        tile = {"height": 28, "width": 28}  # tiny views keep the processor tests fast
        return SliMEImageProcessorPil(size=tile, crop_size=tile)

    @classmethod
    def _setup_tokenizer(cls):
        return AutoTokenizer.from_pretrained(str(DEMO_TOKENIZER))

    def get_component(self, attribute, **kwargs):
        # The saved folder names SliME's classes in `auto_map` (remote code, Decision 2); where `import slime_hf` cannot
        # register the image processor natively (transformers < 5.2x without torchvision) the Auto classes load them
        # as remote code, which asks for consent on stdin unless trust_remote_code=True.
        kwargs.setdefault("trust_remote_code", True)
        return super().get_component(attribute, **kwargs)

    # -- SliME-specific incompatibilities ---------------------------------------------------------------------------
    _NO_OFFSETS = (
        "the exact SentencePiece prompt path (Decision 4) encodes chunk by chunk and returns no offset "
        "mapping, which `return_assistant_tokens_mask` needs; SliME's training collator builds its labels"
    )
    _STRICT_KWARGS = (
        "passes video-sampling kwargs (num_frames, fps) to an image-only processor; SliMEProcessor "
        "refuses kwargs it cannot honour instead of dropping them (design rule: nothing silently dropped)"
    )
    _NEGATIVE_RESCALE = (
        "probes kwargs routing with rescale_factor=-1.0, which SliME's image processor refuses with a "
        "ValueError (Decision 8: bad input is refused); kwargs routing is tested in "
        "tests/test_image_processing.py and tests/test_processing.py"
    )
    _AUTO_MAP = (
        "save_pretrained writes `auto_map` for remote code (Decision 2), so the reloaded processor's dict "
        "carries `auto_map` where the in-memory one has none"
    )

    @unittest.skip(_NO_OFFSETS)
    def test_apply_chat_template_assistant_mask(self):
        pass

    @unittest.skip(_STRICT_KWARGS)
    def test_apply_chat_template_image_0(self):
        pass

    @unittest.skip(_STRICT_KWARGS)
    def test_apply_chat_template_image_1(self):
        pass

    @unittest.skip(_NEGATIVE_RESCALE)
    def test_kwargs_overrides_default_subprocessor_kwargs_0_images(self):
        pass

    @unittest.skip(_NEGATIVE_RESCALE)
    def test_structured_kwargs_nested_from_dict_0_images(self):
        pass

    @unittest.skip(_NEGATIVE_RESCALE)
    def test_subprocessor_defaults_preserved_by_kwargs_0_images(self):
        pass

    @unittest.skip(_NEGATIVE_RESCALE)
    def test_unstructured_kwargs_0_images(self):
        pass

    @unittest.skip(_NEGATIVE_RESCALE)
    def test_unstructured_kwargs_batched_0_images(self):
        pass

    @unittest.skip(_AUTO_MAP)
    def test_processor_from_and_save_pretrained(self):
        pass

    @unittest.skip(_AUTO_MAP)
    def test_processor_from_and_save_pretrained_as_nested_dict(self):
        pass
