"""SliME: CLIP vision tower, global adapter, local compressor, text-guided router and a decoder-only LLM."""

from __future__ import annotations

import inspect
import json
import math
import os
import re
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, GenerationMixin, LogitsProcessorList, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling, CausalLMOutputWithPast
from transformers.utils import ModelOutput, logging

from .configuration_slime import SliMEConfig
from .image_processing_slime import IMAGE_PROCESSOR_AUTO_MAP, get_slice_grid


logger = logging.get_logger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------
def sincos_position_table(dim: int, grid_size: int) -> torch.Tensor:
    """2-D sin-cos table (grid_size**2, dim) in float32, computed in numpy exactly as the original: the first half
    encodes the column, the second the row, each as [sin, cos]."""
    omega = np.arange(dim // 4, dtype=np.float32)
    omega /= dim / 4.0
    omega = 1.0 / 10000**omega
    grid = np.arange(grid_size, dtype=np.float32)
    columns, rows = np.meshgrid(grid, grid)

    def encode(positions):
        out = np.einsum("m,d->md", positions.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return torch.from_numpy(np.concatenate([encode(columns), encode(rows)], axis=1).astype(np.float32))


def _torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


class SliMEResamplerAttention(nn.Module):
    """Multi-head cross-attention with the parameters and arithmetic of `nn.MultiheadAttention` (sequence-first,
    explicit softmax path), written out so that every weight is used through this module or its own submodules:
    that keeps accelerate's per-module offload hooks (`device_map`) correct."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden size {hidden_size} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * hidden_size, hidden_size))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * hidden_size))
        self.out_proj = nn.Linear(hidden_size, hidden_size)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """query (Lq, N, C), key and value (Lk, N, C) -> (Lq, N, C)."""
        query_length, batch, width = query.shape
        key_length = key.shape[0]
        head_dim = width // self.num_heads
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q = F.linear(query, w_q, b_q).view(query_length, batch * self.num_heads, head_dim).transpose(0, 1)
        k = F.linear(key, w_k, b_k).view(key_length, batch * self.num_heads, head_dim).transpose(0, 1)
        v = F.linear(value, w_v, b_v).view(key_length, batch * self.num_heads, head_dim).transpose(0, 1)
        weights = torch.softmax(torch.bmm(q * math.sqrt(1.0 / float(head_dim)), k.transpose(-2, -1)), dim=-1)
        out = torch.bmm(weights, v).transpose(0, 1).contiguous().view(query_length * batch, width)
        return self.out_proj(out).view(query_length, batch, width)


class SliMEResampler(nn.Module):
    """One cross-attention layer of learned queries over vision patches, with sin-cos position tables.

    Queries get the stored table, keys get it bicubically resized to the input grid (rounded to
    `config.position_table_dtype`, as the original), values get no position.
    """

    def __init__(self, config: SliMEConfig, num_queries: int):
        super().__init__()
        hidden = config.vision_config.hidden_size
        self.grid_size = math.isqrt(num_queries)
        self.table_dtype = _torch_dtype(config.position_table_dtype)
        self.queries = nn.Parameter(torch.zeros(num_queries, hidden))
        self.position_table = nn.Parameter(
            sincos_position_table(hidden, self.grid_size).to(self.table_dtype), requires_grad=False
        )
        self.attn = SliMEResamplerAttention(hidden, max(1, hidden // config.resampler_head_dim))
        eps = config.resampler_layer_norm_eps
        self.norm_queries = nn.LayerNorm(hidden, eps=eps)
        self.norm_inputs = nn.LayerNorm(hidden, eps=eps)
        self.norm_output = nn.LayerNorm(hidden, eps=eps)

    def key_position_table(self, input_grid: int) -> torch.Tensor:
        table = self.position_table.detach()
        if input_grid != self.grid_size:
            side = self.grid_size
            table = (
                F.interpolate(
                    table.float().reshape(1, side, side, -1).permute(0, 3, 1, 2),
                    size=(input_grid, input_grid),
                    mode="bicubic",
                    align_corners=False,
                )
                .permute(0, 2, 3, 1)
                .flatten(0, 2)
            )
        return table.to(self.table_dtype)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features (N, L, C) with L a square number -> (N, num_queries, C)."""
        batch, length, _ = features.shape
        input_grid = math.isqrt(length)
        if input_grid * input_grid != length:
            raise ValueError(f"the resampler needs a square number of input tokens, got {length}")
        dtype = features.dtype
        key_positions = self.key_position_table(input_grid).to(dtype)
        query_positions = self.position_table.detach().to(self.table_dtype).to(dtype)
        inputs = self.norm_inputs(features).permute(1, 0, 2)  # sequence-first, as the original
        queries = self.norm_queries(self.queries).unsqueeze(1).repeat(1, batch, 1) + query_positions.unsqueeze(1)
        out = self.attn(queries, inputs + key_positions.unsqueeze(1), inputs)
        return self.norm_output(out.permute(1, 0, 2))


class SliMEProjector(nn.Module):
    """The MLP expert (Linear, GELU, Linear): projects vision width to the LLM width. One module, used by the
    global mixture and by every local token."""

    def __init__(self, config: SliMEConfig):
        super().__init__()
        self.linear_1 = nn.Linear(config.vision_config.hidden_size, config.text_config.hidden_size)
        self.act = ACT2FN["gelu"]
        self.linear_2 = nn.Linear(config.text_config.hidden_size, config.text_config.hidden_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))


class SliMEGlobalAdapter(nn.Module):
    """The global view's adapter: a per-token softmax gate mixing the MLP expert `P(x)` and the attention expert
    `P(R(x))` (R = resampler with one query per vision patch). The MLP expert is not owned: the model applies it."""

    def __init__(self, config: SliMEConfig):
        super().__init__()
        self.mode = config.global_adapter_mode
        self.noise_epsilon = config.gate_noise_epsilon
        self.noise_uses_noise_weight = config.gate_noise_uses_noise_weight
        hidden = config.vision_config.hidden_size
        self.attention_expert = SliMEResampler(config, config.num_global_queries)
        self.gate_weight = nn.Parameter(torch.zeros(hidden, 2))
        self.gate_noise_weight = nn.Parameter(torch.zeros(hidden, 2))

    def gates(self, features: torch.Tensor) -> torch.Tensor:
        """features (T, C) -> gates (T, 2): softmax, top-2 of 2 renormalised with the original's 1e-6."""
        logits = features @ self.gate_weight.to(features.dtype)
        if self.training:
            noise_weight = self.gate_noise_weight if self.noise_uses_noise_weight else self.gate_weight
            noise_std = F.softplus(features @ noise_weight.to(features.dtype)) + self.noise_epsilon
            logits = logits + torch.randn_like(logits) * noise_std
        probs = torch.softmax(logits, dim=1)
        top_values, top_indices = probs.topk(2, dim=1)
        top_gates = top_values / (top_values.sum(1, keepdim=True) + 1e-6)
        return torch.zeros_like(probs).scatter(1, top_indices, top_gates)

    def forward(
        self, features: torch.Tensor, mlp_out: torch.Tensor | None, attention_out: torch.Tensor | None
    ) -> torch.Tensor:
        """features (N, 576, C) of global views, and the experts' outputs (N, 576, d) that the mode uses: the MLP
        expert `P(x)` and the attention expert `P(R(x))`. The caller applies the projector `P` (a module passed as
        an argument would break accelerate's offload hooks). Returns (N, 576, d)."""
        if self.mode == "mlp":
            return mlp_out
        if self.mode == "attention":
            return attention_out
        batch, length, width = features.shape
        gates = self.gates(features.reshape(batch * length, width)).reshape(batch, length, 2)
        experts = torch.stack([mlp_out, attention_out], dim=-1)
        return torch.matmul(experts, gates.unsqueeze(-1)).squeeze(-1)


class SliMECosineRouter(nn.Module):
    """Text-guided router: score = masked SUM over the prompt of the cosine similarity between a local token and
    each text embedding; keep the top-p of softmax(score / temperature) plus one, in ascending order."""

    def __init__(self, config: SliMEConfig):
        super().__init__()
        self.temperature = config.router_temperature
        self.noise_std = config.router_noise_std

    @staticmethod
    def scores(local_tokens: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """local_tokens (L, d), text (T, d), text_mask (T,) bool -> scores (L,). Chunked over L (bit-identical to
        the unchunked broadcast, which would need L*T*d memory)."""
        chunk = max(1, (1 << 24) // max(1, text.shape[0] * text.shape[1]))
        dropped = ~text_mask.bool()
        out = []
        for start in range(0, local_tokens.shape[0], chunk):
            cos = F.cosine_similarity(local_tokens[start : start + chunk].unsqueeze(1), text.unsqueeze(0), dim=-1)
            out.append(cos.masked_fill(dropped.unsqueeze(0), 0.0).sum(dim=-1))
        return torch.cat(out)

    def select(self, scores: torch.Tensor, top_p: float) -> torch.Tensor:
        """scores (L,) -> kept indices, ascending (same float32 ops as the original, for identical cuts)."""
        if self.training and self.noise_std:
            scores = scores + torch.randn_like(scores) * self.noise_std
        probs = torch.softmax(scores / self.temperature, dim=-1)
        sorted_probs, sorted_indices = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=0)
        within = int((cumulative <= top_p).sum())
        if within < sorted_indices.numel():
            kept = sorted_indices[: within + 1]
        else:
            kept = torch.arange(sorted_indices.numel(), device=scores.device)
        return kept.sort().values


_CACHE_ARGUMENT_NAMES: dict[type, str] = {}


def _cache_argument_name(module: nn.Module) -> str:
    """The KV-cache argument of a text model's forward: `cache` in newer transformers, `past_key_values` before
    (looked up once per class: every decoding step asks)."""
    name = _CACHE_ARGUMENT_NAMES.get(type(module))
    if name is None:
        name = "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"
        _CACHE_ARGUMENT_NAMES[type(module)] = name
    return name


GENERATE_TAKES_CACHE = "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters


def _cache_kwarg_renamed(forward):
    """Where the installed transformers renamed `past_key_values` to `cache` (5.25), accept the old name with the
    same deprecation warning as its in-tree models; elsewhere the forward takes both names as they are."""
    if not GENERATE_TAKES_CACHE:
        return forward
    from transformers.utils.deprecation import deprecate_kwarg

    return deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")(forward)


def _cache_output(outputs) -> dict:
    """The KV cache of a text model's output under the field name this transformers version uses."""
    if "cache" in getattr(outputs, "__dataclass_fields__", {}):
        return {"cache": outputs.cache}
    return {"past_key_values": outputs.past_key_values}


# ----------------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------------
# transformers >= 5.25 gives multimodal outputs an `image_outputs` field; older versions have the plain text outputs.
try:
    from transformers.modeling_outputs import MultimodalBaseModelOutputWithPast as _BaseOutputWithPast
    from transformers.modeling_outputs import MultimodalCausalLMOutputWithPast as _CausalLMOutputWithPast
except ImportError:  # transformers < 5.25
    _BaseOutputWithPast, _CausalLMOutputWithPast = BaseModelOutputWithPast, CausalLMOutputWithPast
OUTPUTS_CARRY_IMAGE_OUTPUTS = "image_outputs" in _CausalLMOutputWithPast.__dataclass_fields__


@dataclass
class SliMEImageFeatures(BaseModelOutputWithPooling):
    """What the vision path produces for a batch of images (compatible with `BaseModelOutputWithPooling`).

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(num_views, num_patches, vision_hidden)`): the vision
            tower's features of `config.vision_feature_layer` (CLS dropped) for every real view of the batch, image
            by image (its global view, then its local crops).
        pooler_output (`list[torch.FloatTensor]`): per image, the token block the LLM sees in place of its
            `<image>`: `[global (576); separator (1); kept local]` (or one part only under the stage switches). Without
            text to route against, every local token is kept: the features before routing. Also `image_features`.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*): the vision tower's hidden states (views in the same
            order), with `output_hidden_states=True` (default: `config.output_hidden_states`).
        attentions (`tuple(torch.FloatTensor)`, *optional*): the vision tower's attentions, with
            `output_attentions=True` (default: `config.output_attentions`).
        selected_indices (`list[torch.LongTensor]`): per image, kept positions in the merged local raster
            (empty under `use_global_only`).
        image_token_budget (`list[dict]`): per image, `global`, `separator`, `local_kept`, `local_total`, `total`.
        router_scores (`list[torch.FloatTensor]`): per image, the router's scores of every local token (routed calls).
        local_tokens (`list[torch.FloatTensor]`): per image, all projected local tokens in merged raster order.
        global_tokens (`list[torch.FloatTensor]`): per image, the global adapter's 576 tokens.
    """

    selected_indices: list | None = None
    image_token_budget: list | None = None
    router_scores: list | None = None
    local_tokens: list | None = None
    global_tokens: list | None = None

    @property
    def image_features(self) -> list | None:
        """Per image, the token block the LLM sees (the same list as `pooler_output`)."""
        return self.pooler_output


@dataclass
class SliMEPreparedInputs(ModelOutput):
    """The text model's input, as [`SliMEModel.prepare_multimodal_inputs`] assembles it.

    Args:
        inputs_embeds (`torch.FloatTensor` of shape `(batch, assembled_length, hidden)`): text embeddings with each
            image's token block spliced in at its `<image>`; padding and dropped local tokens never appear.
        attention_mask (`torch.LongTensor` of shape `(batch, assembled_length)`): mask of the assembled rows.
        position_ids (`torch.LongTensor`, *optional*): consecutive positions from each row's first real token
            (`None` for text-only rows that were not re-laid out).
        input_ids (`torch.LongTensor` of shape `(batch, assembled_length)`): ids matching `inputs_embeds`: the text
            ids, `config.image_token_id` at every image position, the pad id at padding.
        labels (`torch.LongTensor`, *optional*): labels aligned with the assembled rows (image positions -100).
        selected_indices (`list[torch.LongTensor]`): per image, the kept local token indices.
        image_token_budget (`list[dict]`): per image, tokens the LLM sees (see [`SliMEImageFeatures`]).
        truncated_positions (`torch.LongTensor` of shape `(batch,)`, *optional*): with a training length limit,
            the positions cut from the end of each assembled row.
        image_outputs ([`SliMEImageFeatures`], *optional*): the vision path's output (`None` without images).
    """

    inputs_embeds: torch.FloatTensor | None = None
    attention_mask: torch.LongTensor | None = None
    position_ids: torch.LongTensor | None = None
    input_ids: torch.LongTensor | None = None
    labels: torch.LongTensor | None = None
    selected_indices: list | None = None
    image_token_budget: list | None = None
    truncated_positions: torch.LongTensor | None = None
    image_outputs: SliMEImageFeatures | None = None


@dataclass
class SliMEModelOutputWithPast(_BaseOutputWithPast):
    """Output of [`SliMEModel`]: the text model's output (its KV-cache field named as in the installed transformers;
    `image_outputs` where the installed version has that field) plus the assembled sequence's bookkeeping.

    Args:
        attention_mask (`torch.LongTensor` of shape `(batch, assembled_length)`): mask of the assembled sequence.
        labels (`torch.LongTensor`, *optional*): labels aligned with the assembled sequence (image positions -100).
        selected_indices (`list[torch.LongTensor]`, *optional*): per image, the kept local token indices.
        image_token_budget (`list[dict]`, *optional*): per image, tokens the LLM sees (see [`SliMEImageFeatures`]).
        truncated_positions (`torch.LongTensor` of shape `(batch,)`, *optional*): with labels and
            `config.training_max_length`, the positions cut from the end of each assembled row.
    """

    attention_mask: torch.LongTensor | None = None
    labels: torch.LongTensor | None = None
    selected_indices: list | None = None
    image_token_budget: list | None = None
    truncated_positions: torch.LongTensor | None = None


@dataclass
class SliMECausalLMOutputWithPast(_CausalLMOutputWithPast):
    """Output of [`SliMEForConditionalGeneration`]: loss, logits and KV cache as for any causal LM (and
    `image_outputs` where the installed transformers has that field), plus:

    Args:
        attention_mask (`torch.LongTensor`): mask of the assembled sequence (what the logits are aligned with).
        selected_indices (`list[torch.LongTensor]`, *optional*): per image, the kept local token indices.
        image_token_budget (`list[dict]`, *optional*): per image, `global`, `separator`, `local_kept`,
            `local_total`, `total`.
        truncated_positions (`torch.LongTensor` of shape `(batch,)`, *optional*): with labels and
            `config.training_max_length`, the positions cut from the end of each assembled row.
        log_probs, entropy, is_top1, label_mask (`torch.Tensor` of shape `(batch, assembled_length - 1)`, *optional*):
            with `fused_lm_head=True` (trl's protocol): per next-token label of the assembled sequence, its
            log-probability, the entropy of the distribution, whether it is the argmax, and whether it is a target;
            zero / False where the label is -100.
    """

    attention_mask: torch.LongTensor | None = None
    selected_indices: list | None = None
    image_token_budget: list | None = None
    truncated_positions: torch.LongTensor | None = None
    log_probs: torch.FloatTensor | None = None
    entropy: torch.FloatTensor | None = None
    is_top1: torch.BoolTensor | None = None
    label_mask: torch.BoolTensor | None = None


def _prepared_fields(prepared: SliMEPreparedInputs) -> dict:
    """The per-call results of the preparation that the model outputs carry."""
    return {
        "selected_indices": prepared.selected_indices,
        "image_token_budget": prepared.image_token_budget,
        "truncated_positions": prepared.truncated_positions,
        **_image_outputs_field(prepared.image_outputs),
    }


def _image_outputs_field(image_outputs: SliMEImageFeatures | None) -> dict:
    return {"image_outputs": image_outputs} if OUTPUTS_CARRY_IMAGE_OUTPUTS else {}


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------
REMOTE_CODE_FILES = (
    "configuration_slime.py",
    "image_processing_slime.py",
    "processing_slime.py",
    "tokenization_slime.py",
    "modeling_slime.py",
)
AUTO_MAP = {
    "AutoConfig": "configuration_slime.SliMEConfig",
    "AutoModel": "modeling_slime.SliMEForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_slime.SliMEForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_slime.SliMEForConditionalGeneration",
    "AutoProcessor": "processing_slime.SliMEProcessor",
    "AutoImageProcessor": dict(IMAGE_PROCESSOR_AUTO_MAP),
}


def copy_remote_code(save_directory: str) -> None:
    """Copies the self-contained code files next to saved weights, so `trust_remote_code=True` loads them."""
    import shutil

    source = os.path.dirname(os.path.abspath(__file__))
    for name in REMOTE_CODE_FILES:
        path = os.path.join(source, name)
        if os.path.isfile(path) and os.path.abspath(os.path.join(save_directory, name)) != path:
            shutil.copyfile(path, os.path.join(save_directory, name))


def _keep_used_weight_conversions(model: PreTrainedModel) -> None:
    """
    Keeps only the used entries of `model._weight_conversions`, the key conversions `save_pretrained` reverts.

    Works around a private transformers attribute (5.17 to 5.25 at least; no public API): `from_pretrained` records
    on the model the conversions that matched checkpoint keys, and `save_pretrained` reverts all it finds there.
    Regular loading records the used ones only, but ZeRO-3 loading keeps every candidate, the unused legacy
    renamings too, and reverting those would save `model.language_model.model.*` names. This filters the list as
    regular loading does. `tests/test_transformers_private.py` fails when transformers renames the attribute or
    stops reverting it, so that this function gets revisited.
    """
    conversions = getattr(model, "_weight_conversions", None)
    if conversions and all(hasattr(c, "was_used") for c in conversions):
        model._weight_conversions = [c for c in conversions if c.was_used()]


def _write_default_model_card(folder: str, config: SliMEConfig) -> None:
    """A model card (`README.md`) for a saved folder that has none, when the slime_hf package is installed (a lazy
    import, skipped with the remote code alone). The trainer and the converter write fuller cards; an existing
    `README.md` is never replaced."""
    if os.path.exists(os.path.join(folder, "README.md")):
        return
    try:
        from slime_hf.model_card import save_model_card
    except ImportError:
        return
    source = getattr(config, "_name_or_path", None) or None
    # Hub metadata takes Hub ids only (a local starting point is not named).
    hub_id = source if source and not os.path.exists(source) and re.match(r"^[\w.-]+/[\w.-]+$", source) else None
    save_model_card(folder, base_model=hub_id, router_top_p=config.router_top_p)


class SliMEPreTrainedModel(PreTrainedModel):
    config_class = SliMEConfig
    config: SliMEConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["SliMEResampler", "SliMEGlobalAdapter", "SliMEProjector"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Saves weights (package names only), config with `auto_map`, and the code files for remote loading."""
        self.config.auto_map = dict(AUTO_MAP)
        _keep_used_weight_conversions(self)
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            copy_remote_code(str(save_directory))
            _write_default_model_card(str(save_directory), self.config)

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, SliMEResampler):
            nn.init.trunc_normal_(module.queries, std=0.02)
            table = sincos_position_table(module.position_table.shape[1], module.grid_size)
            module.position_table.copy_(table.to(module.table_dtype).to(module.position_table.dtype))
        elif isinstance(module, SliMEResamplerAttention):
            nn.init.xavier_uniform_(module.in_proj_weight)
            module.in_proj_bias.zero_()
            module.out_proj.bias.zero_()
        elif isinstance(module, SliMEGlobalAdapter):
            module.gate_weight.zero_()
            module.gate_noise_weight.zero_()


class SliMEModel(SliMEPreTrainedModel):
    """SliME without the language-model head: vision path, assembly of the LLM input, text model."""

    # Never quantized: transformers' quantizers (bitsandbytes, torchao, quanto, ...) skip `_keep_in_fp32_modules`, so
    # the router's inputs, hence the kept local tokens, are those of the unquantized model. The router has no weights.
    # (A float16 load keeps these in float32 too; bfloat16 and float32 loads are unchanged.)
    _keep_in_fp32_modules = ["vision_tower", "projector", "global_adapter", "local_compressor"]

    def __init__(self, config: SliMEConfig):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.projector = SliMEProjector(config)
        self.global_adapter = SliMEGlobalAdapter(config)
        self.local_compressor = SliMEResampler(config, config.local_compressor_num_queries)
        self.router = SliMECosineRouter(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    @property
    def adapter_dtype(self) -> torch.dtype:
        """The dtype the adapters compute in. Read from a LayerNorm, which no quantization method replaces (the
        projector's weights may be quantized integers)."""
        return self.local_compressor.norm_output.weight.dtype

    # -- checks -------------------------------------------------------------------------------------------------
    def _check_image_inputs(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> list[tuple[int, int]]:
        if not torch.is_tensor(pixel_values) or not torch.is_floating_point(pixel_values):
            raise ValueError(
                f"pixel_values must be a floating-point tensor, got {type(pixel_values).__name__} "
                f"{getattr(pixel_values, 'dtype', '')}"
            )
        tile = self.config.vision_config.image_size
        if pixel_values.ndim != 5 or tuple(pixel_values.shape[2:]) != (3, tile, tile):
            raise ValueError(
                f"pixel_values must have shape (num_images, max_views, 3, {tile}, {tile}), "
                f"got {tuple(pixel_values.shape)}"
            )
        if image_sizes is None:
            raise ValueError("image_sizes (num_images, 2) as (height, width) is required with pixel_values")
        if not torch.is_tensor(image_sizes):
            image_sizes = torch.as_tensor(image_sizes)
        if torch.is_floating_point(image_sizes) or image_sizes.ndim != 2 or image_sizes.shape[1] != 2:
            raise ValueError(
                f"image_sizes must be an integer tensor of shape (num_images, 2), got "
                f"{tuple(image_sizes.shape)} {image_sizes.dtype}"
            )
        if image_sizes.shape[0] != pixel_values.shape[0]:
            raise ValueError(
                f"pixel_values holds {pixel_values.shape[0]} images but image_sizes {image_sizes.shape[0]}"
            )
        sizes = [(int(h), int(w)) for h, w in image_sizes.tolist()]
        # Views are zero-padded; a real (normalised) view is never all zeros. A size whose grid needs fewer views
        # than were given would silently drop crops; a transposed size with the same view count cannot be told
        # apart from the pixels, which is why image_sizes must come from the processor.
        given = pixel_values.flatten(2).ne(0).any(-1).sum(1).tolist()
        for index, size in enumerate(sizes):
            rows, cols = get_slice_grid(size)
            needed = rows * cols + 1
            if needed > pixel_values.shape[1]:
                raise ValueError(
                    f"image {index} of size {size} needs {needed} views but pixel_values "
                    f"has only {pixel_values.shape[1]}"
                )
            if needed < given[index]:
                raise ValueError(
                    f"image {index}: image_sizes {list(size)} gives a {rows}x{cols} grid ({needed} views) "
                    f"but pixel_values holds {given[index]} non-padding views; pass the image_sizes the "
                    "processor returned with these pixel_values"
                )
        return sizes

    def _check_length_before_encoding(self, real: torch.Tensor, is_image: torch.Tensor) -> None:
        """Refuses, before any image is encoded, rows that cannot fit the text model even if the router keeps a
        single local token per image (the exact length is checked again after routing)."""
        limit = getattr(self.config.text_config, "max_position_embeddings", None)
        if limit is None or not bool(is_image.any()):
            return
        vision = self.config.vision_config
        block = 0
        if not self.config.use_local_only:
            block += (vision.image_size // vision.patch_size) ** 2
        if not self.config.use_local_only and not self.config.use_global_only:
            block += 1  # separator
        if not self.config.use_global_only:
            block += 1  # the router keeps at least one local token
        shortest = (real & ~is_image).sum(1) + is_image.sum(1) * block
        longest = int(shortest.max())
        if longest > limit:
            row = int(shortest.argmax())
            raise ValueError(
                f"row {row} needs at least {longest} positions (text + {int(is_image[row].sum())} image "
                f"blocks of at least {block} tokens), {longest - limit} more than the text model's "
                f"max_position_embeddings={limit}"
            )

    # -- vision path --------------------------------------------------------------------------------------------
    def global_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """features (N, 576, C) of global views -> the global adapter's tokens (N, 576, d)."""
        mode = self.global_adapter.mode
        attention_out = None
        if mode != "mlp":
            attention_out = self.projector(self.global_adapter.attention_expert(features))
        mlp_out = self.projector(features) if mode != "attention" else None
        return self.global_adapter(features, mlp_out, attention_out)

    def encode_views(
        self, views: torch.Tensor, output_hidden_states: bool = False, output_attentions: bool = False
    ) -> torch.Tensor | BaseModelOutputWithPooling:
        """views (V, 3, H, W) -> patch features (V, P, C) of `config.vision_feature_layer`, CLS dropped. Frozen.

        With `output_hidden_states` or `output_attentions`, returns the vision tower's output with those fields and
        the selected features as `last_hidden_state`.
        """
        tower = self.vision_tower
        with torch.no_grad():
            out = tower(views.to(tower.dtype), output_hidden_states=True, output_attentions=output_attentions)
        features = out.hidden_states[self.config.vision_feature_layer][:, 1:]
        if not (output_hidden_states or output_attentions):
            return features
        return BaseModelOutputWithPooling(
            last_hidden_state=features,
            hidden_states=out.hidden_states if output_hidden_states else None,
            attentions=out.attentions if output_attentions else None,
        )

    def _text_for_routing(
        self, input_ids, attention_mask, labels, row: int, row_embeds: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The text the router compares one sample's images with, laid out as the original: the sample's
        non-image tokens embedded, then one zero row (masked) per removed image placeholder. `row_embeds`: the
        row's tokens already embedded (one embedding call for the whole batch)."""
        ids = input_ids[row]
        real = attention_mask[row].bool() if attention_mask is not None else torch.ones_like(ids, dtype=torch.bool)
        ids = ids[real]
        is_image = ids == self.config.image_token_id
        text_ids = ids[~is_image]
        text_mask = torch.ones_like(text_ids, dtype=torch.bool)
        if labels is not None and not self.config.router_reads_answers:
            text_mask = labels[row][real][~is_image] == -100
        limit = self.config.training_max_length
        if labels is not None and limit is not None:
            # The original cuts the router's text to the same limit (a no-op for rows the data already cut).
            text_ids, text_mask = text_ids[:limit], text_mask[:limit]
        if row_embeds is None:
            embeds = self.get_input_embeddings()(text_ids)
        else:
            embeds = row_embeds[real][~is_image][: text_ids.shape[0]]
        num_images = int(is_image.sum())
        embeds = torch.cat([embeds, embeds.new_zeros(num_images, embeds.shape[-1])])
        text_mask = torch.cat([text_mask, text_mask.new_zeros(num_images)])
        return embeds, text_mask

    def get_image_features(
        self,
        pixel_values: torch.FloatTensor,
        image_sizes: torch.LongTensor,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        router_top_p: float | None = None,
        image_to_row: list[int] | None = None,
        token_embeds: torch.FloatTensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
    ) -> SliMEImageFeatures | tuple:
        """Runs the vision path for every image of the batch.

        Without `input_ids` there is no text to route against and every local token is kept: `pooler_output` then
        holds the image features before routing (`[global; separator; all local]` per image). With `input_ids`,
        each image is routed against its own sample's text and `pooler_output` holds what the LLM sees.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(num_images, max_views, 3, 336, 336)`): from the processor.
            image_sizes (`torch.LongTensor` of shape `(num_images, 2)`): (height, width) of each original image, as
                the processor returned them.
            input_ids (`torch.LongTensor`, *optional*): the prompts; each image is routed against its own sample's
                text.
            attention_mask (`torch.Tensor`, *optional*): padding mask of `input_ids`.
            labels (`torch.LongTensor`, *optional*): training labels (for `router_reads_answers=False`).
            router_top_p (`float`, *optional*): overrides `config.router_top_p` for this call.
            image_to_row (`list[int]`, *optional*): the sample (row) of each image; derived from the image tokens
                of `input_ids` when omitted.
            token_embeds (`torch.FloatTensor` of shape `(batch, length, hidden)`, *optional*): `input_ids` already
                embedded (see [`~SliMEModel.embed_tokens`]), so the router does not embed them again.
            output_hidden_states (`bool`, *optional*): also return the vision tower's hidden states.
            output_attentions (`bool`, *optional*): also return the vision tower's attentions.
            return_dict (`bool`, *optional*): return a [`SliMEImageFeatures`] (default) or a tuple.
        """
        config = self.config
        sizes = self._check_image_inputs(pixel_values, image_sizes)
        routed = input_ids is not None
        if output_hidden_states is None:
            output_hidden_states = config.output_hidden_states
        if output_attentions is None:
            output_attentions = config.output_attentions
        top_p = config.router_top_p if router_top_p is None else float(router_top_p)
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"router_top_p must be in (0, 1], got {top_p}")
        grids = [get_slice_grid(size) for size in sizes]
        use_global = not config.use_local_only
        use_local = not config.use_global_only
        if routed and image_to_row is None:
            image_to_row = self._image_rows(input_ids, attention_mask)
        if image_to_row is not None and len(image_to_row) != len(sizes):
            raise ValueError(
                f"the prompts hold {len(image_to_row)} image placeholders but {len(sizes)} images were given"
            )

        # One vision-tower call over the real views of the whole batch (global views first, then local crops).
        view_counts = [rows * cols for rows, cols in grids]
        views = []
        if use_global:
            views.append(pixel_values[:, 0])
        if use_local:
            views.extend(pixel_values[i, 1 : 1 + n] for i, n in enumerate(view_counts))
        adapter_dtype = self.adapter_dtype
        tower_out = self.encode_views(torch.cat(views), bool(output_hidden_states), bool(output_attentions))
        selected_features = tower_out if torch.is_tensor(tower_out) else tower_out.last_hidden_state
        features = selected_features.to(adapter_dtype)

        num_images = len(sizes)
        global_tokens = [None] * num_images
        if use_global:
            global_out = self.global_tokens(features[:num_images])
            global_tokens = list(global_out.unbind(0))
            features = features[num_images:]

        separator = None
        if use_global and use_local:
            separator = self.separator_embedding(pixel_values.device).to(adapter_dtype)

        local_tokens, scores_list, kept_list, blocks, budgets = [], [], [], [], []
        if use_local:
            compressed = self.projector(self.local_compressor(features))  # (total crops, q, d)
            side = self.local_compressor.grid_size
            per_image = compressed.split(view_counts)
            text_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
            embedded = None
            if routed:
                embedded = token_embeds if token_embeds is not None else self.embed_tokens(input_ids)
            for index, ((rows, cols), crops) in enumerate(zip(grids, per_image)):
                merged = crops.view(rows, cols, side, side, -1).permute(0, 2, 1, 3, 4).flatten(0, 3)
                local_tokens.append(merged)
                if not routed:
                    kept_list.append(torch.arange(merged.shape[0], device=merged.device))
                    continue
                row = image_to_row[index]
                if row not in text_cache:
                    text_cache[row] = self._text_for_routing(input_ids, attention_mask, labels, row, embedded[row])
                text, text_mask = text_cache[row]
                scores = self.router.scores(merged, text.to(merged.dtype), text_mask)
                kept = self.router.select(scores.float() if scores.dtype != torch.float32 else scores, top_p)
                scores_list.append(scores)
                kept_list.append(kept)
        for index in range(num_images):
            parts = []
            budget = {"global": 0, "separator": 0, "local_kept": 0, "local_total": 0}
            if use_global:
                parts.append(global_tokens[index])
                budget["global"] = global_tokens[index].shape[0]
            if separator is not None:
                parts.append(separator)
                budget["separator"] = 1
            if use_local:
                parts.append(local_tokens[index][kept_list[index]])
                budget["local_kept"] = int(kept_list[index].numel())
                budget["local_total"] = int(local_tokens[index].shape[0])
            budget["total"] = budget["global"] + budget["separator"] + budget["local_kept"]
            blocks.append(torch.cat(parts))
            budgets.append(budget)
        empty = torch.empty(0, dtype=torch.long, device=pixel_values.device)
        # The tower ran global views first, then every image's crops; the outputs list each image's views together.
        per_image_order = self._views_by_image(view_counts, use_global, use_local, pixel_values.device)

        def by_image(tensors):
            return None if tensors is None else tuple(t[per_image_order] for t in tensors)

        output = SliMEImageFeatures(
            last_hidden_state=selected_features[per_image_order],
            pooler_output=blocks,
            hidden_states=None if torch.is_tensor(tower_out) else by_image(tower_out.hidden_states),
            attentions=None if torch.is_tensor(tower_out) else by_image(tower_out.attentions),
            selected_indices=kept_list if use_local else [empty] * num_images,
            image_token_budget=budgets,
            router_scores=scores_list or None,
            local_tokens=local_tokens or None,
            global_tokens=global_tokens if use_global else None,
        )
        return_dict = return_dict if return_dict is not None else config.return_dict
        return output if return_dict else output.to_tuple()

    @staticmethod
    def _views_by_image(
        view_counts: list[int], use_global: bool, use_local: bool, device: torch.device
    ) -> torch.Tensor:
        """Indices that reorder the tower's batch (global views, then all crops) into each image's views in turn."""
        num_images = len(view_counts)
        crop_start = num_images if use_global else 0
        order = []
        for index, count in enumerate(view_counts):
            if use_global:
                order.append(index)
            if use_local:
                order.extend(range(crop_start, crop_start + count))
                crop_start += count
        return torch.tensor(order, dtype=torch.long, device=device)

    def embed_tokens(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """Token embeddings of `input_ids`, image tokens embedded as id 0 (their positions take image features).

        Called once per forward and shared between the router and the assembly: under ZeRO-3 each call gathers the
        embedding matrix collectively, so every rank makes the same single call whatever its batch holds.
        """
        return self.get_input_embeddings()(input_ids.masked_fill(input_ids == self.config.image_token_id, 0))

    def separator_embedding(self, device: torch.device) -> torch.Tensor:
        """`(1, hidden)`: the embedding of the token between the global and the kept local tokens."""
        return self.get_input_embeddings()(torch.tensor([self.config.separator_token_id], device=device))

    def dummy_image_anchor(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None, token_embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        """A zero that depends on every vision module the config uses (for training batches without images).

        A training batch without images runs one black dummy image (one global view, one local crop) through the
        global adapter, the local compressor and the router, and adds its output multiplied by zero: every rank then
        runs the same modules on every step, so DDP sees a gradient (zero) for every trained parameter and ZeRO-3
        gathers the same parameters on every rank.
        """
        tile = self.config.vision_config.image_size
        dtype = self.adapter_dtype
        features = self.encode_views(torch.zeros(2, 3, tile, tile, device=input_ids.device)).to(dtype)
        total = features.new_zeros(())
        if not self.config.use_local_only:
            total = total + self.global_tokens(features[:1]).sum()
        if not self.config.use_local_only and not self.config.use_global_only:
            total = total + self.separator_embedding(input_ids.device).to(dtype).sum()  # where the image path has it
        if not self.config.use_global_only:
            local = self.projector(self.local_compressor(features[1:]))[0]
            row_embeds = None if token_embeds is None else token_embeds[0]
            text, text_mask = self._text_for_routing(input_ids, attention_mask, None, 0, row_embeds)
            kept = self.router.select(self.router.scores(local, text.to(local.dtype), text_mask).float(), 1.0)
            total = total + local[kept].sum()
        return total * 0.0

    def _image_rows(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[int]:
        is_image = input_ids == self.config.image_token_id
        if attention_mask is not None:
            is_image = is_image & attention_mask.bool()
        return is_image.nonzero()[:, 0].tolist()

    # -- the one preparation path ---------------------------------------------------------------------------------
    def prepare_multimodal_inputs(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_sizes: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        router_top_p: float | None = None,
        padding_side: str | None = None,
        max_length: int | None = None,
    ) -> SliMEPreparedInputs:
        """Turns the processor's output into the text model's input: checks the placeholders and the length, embeds
        the tokens once, runs the vision path and the router, and assembles the rows. `forward`, `generate` and the
        serving front end all call this one function.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch, length)`): prompts with one image token per image.
            attention_mask (`torch.Tensor` of shape `(batch, length)`, *optional*): padding mask of `input_ids`.
            pixel_values (`torch.FloatTensor` of shape `(num_images, max_views, 3, 336, 336)`, *optional*).
            image_sizes (`torch.LongTensor` of shape `(num_images, 2)`, *optional*): (height, width) per image.
            labels (`torch.LongTensor`, *optional*): training labels aligned with `input_ids`.
            router_top_p (`float`, *optional*): overrides `config.router_top_p` for this call.
            padding_side (`str`, *optional*): side of the re-padding of the assembled rows (`"left"` by default,
                `"right"` when labels are given).
            max_length (`int`, *optional*): training limit on the assembled rows (cut at the end, never inside an
                image block).

        Returns:
            [`SliMEPreparedInputs`]. Text-only rows keep their layout unless `max_length` cuts them.
        """
        if input_ids is None:
            raise ValueError("the model needs input_ids (or inputs_embeds)")
        mask_matches = attention_mask is not None and attention_mask.shape == input_ids.shape
        real = attention_mask.bool() if mask_matches else torch.ones_like(input_ids, dtype=torch.bool)
        is_image = (input_ids == self.config.image_token_id) & real
        num_images = 0 if pixel_values is None else int(pixel_values.shape[0])
        num_placeholders = int(is_image.sum())
        if num_placeholders != num_images:
            given = f"{num_images} images were given (pixel_values)" if num_images else "no pixel_values were given"
            raise ValueError(f"the prompts hold {num_placeholders} image placeholders but {given}")
        if num_images:  # the images themselves are checked by get_image_features, also before any encoding
            self._check_length_before_encoding(real, is_image)
        # The same calls with and without images, in the same order (ZeRO-3 gathers each module's parameters
        # collectively): the token embedding once, then the vision path (the dummy image for text-only training).
        token_embeds = self.embed_tokens(input_ids)
        if not num_images:
            anchor = None
            if self.training and torch.is_grad_enabled():
                anchor = self.dummy_image_anchor(input_ids, attention_mask if mask_matches else None, token_embeds)
            if max_length is not None and int(real.sum(1).max()) > max_length:
                prepared = self.assemble_inputs(
                    input_ids, attention_mask, [], labels, padding_side, max_length, token_embeds
                )
            else:
                prepared = SliMEPreparedInputs(
                    inputs_embeds=token_embeds,
                    attention_mask=attention_mask,
                    input_ids=input_ids,
                    labels=labels,
                    truncated_positions=torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device),
                )
            if anchor is not None:
                prepared.inputs_embeds = prepared.inputs_embeds + anchor.to(prepared.inputs_embeds.dtype)
            return prepared
        image_outputs = self.get_image_features(
            pixel_values,
            image_sizes,
            input_ids,
            attention_mask,
            labels,
            router_top_p,
            token_embeds=token_embeds,
            return_dict=True,
        )
        prepared = self.assemble_inputs(
            input_ids, attention_mask, image_outputs.pooler_output, labels, padding_side, max_length, token_embeds
        )
        prepared.selected_indices = image_outputs.selected_indices
        prepared.image_token_budget = image_outputs.image_token_budget
        prepared.image_outputs = image_outputs
        return prepared

    def assemble_inputs(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None,
        image_features: list[torch.Tensor],
        labels: torch.LongTensor | None = None,
        padding_side: str | None = None,
        max_length: int | None = None,
        token_embeds: torch.Tensor | None = None,
    ) -> SliMEPreparedInputs:
        """Splices each image's token block at its image token and compacts every row: padding and dropped
        tokens never reach the LLM; rows are re-padded (left for generation, right when `labels` are given).

        With `max_length` (training), a row longer than it is cut at the end, as the original does after splicing;
        a cut that would fall inside an image block, or drop one, raises a `ValueError` naming the row and image.

        `token_embeds`: `input_ids` already embedded ([`~SliMEModel.embed_tokens`]).

        Returns a [`SliMEPreparedInputs`] with the assembled `inputs_embeds`, `attention_mask`, `position_ids`,
        `input_ids`, `labels` and `truncated_positions` (the positions cut from each row).
        """
        if padding_side is None:
            padding_side = "right" if labels is not None else "left"
        batch, length = input_ids.shape
        device = input_ids.device
        real = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        is_image = (input_ids == self.config.image_token_id) & real
        if int(is_image.sum()) != len(image_features):
            raise ValueError(
                f"the prompts hold {int(is_image.sum())} image placeholders but {len(image_features)} images were given"
            )
        text_embeds = token_embeds if token_embeds is not None else self.embed_tokens(input_ids)
        dtype = text_embeds.dtype

        # Every real token occupies one position, an image token the length of its block.
        counts = real.long()
        if image_features:
            block_lengths = torch.tensor([f.shape[0] for f in image_features], device=device)
            counts = counts.masked_scatter(is_image, block_lengths)
        lengths = counts.sum(1)
        unpadded_starts = counts.cumsum(1) - counts
        is_text = real & ~is_image
        truncated = torch.zeros_like(lengths)
        if max_length is not None and bool((lengths > max_length).any()):
            self._check_cut_outside_images(unpadded_starts, is_image, image_features, max_length)
            is_text = is_text & (unpadded_starts < max_length)
            truncated = (lengths - max_length).clamp(min=0)
            lengths = lengths.clamp(max=max_length)
        total = int(lengths.max()) if batch else 0
        limit = getattr(self.config.text_config, "max_position_embeddings", None)
        if limit is not None and total > limit:
            raise ValueError(
                f"the assembled sequence has {total} positions (text + image tokens), "
                f"{total - limit} more than the text model's max_position_embeddings={limit}"
            )
        offsets = (total - lengths) if padding_side == "left" else torch.zeros_like(lengths)
        starts = unpadded_starts + offsets.unsqueeze(1)

        out = text_embeds.new_zeros(batch, total, text_embeds.shape[-1])
        ids = input_ids.new_full((batch, total), self._pad_id())
        rows, cols = is_text.nonzero(as_tuple=True)
        out = out.index_put((rows, starts[rows, cols]), text_embeds[rows, cols])
        ids[rows, starts[rows, cols]] = input_ids[rows, cols]
        if image_features:
            image_rows, image_cols = is_image.nonzero(as_tuple=True)
            block_rows = image_rows.repeat_interleave(block_lengths)
            within = torch.arange(int(block_lengths.sum()), device=device) - (
                block_lengths.cumsum(0) - block_lengths
            ).repeat_interleave(block_lengths)
            block_pos = starts[image_rows, image_cols].repeat_interleave(block_lengths) + within
            out = out.index_put((block_rows, block_pos), torch.cat(image_features).to(dtype))
            ids[block_rows, block_pos] = self.config.image_token_id

        positions = torch.arange(total, device=device).unsqueeze(0) - offsets.unsqueeze(1)
        new_mask = ((positions >= 0) & (positions < lengths.unsqueeze(1))).long()
        position_ids = positions.clamp(min=0) * new_mask
        new_labels = None
        if labels is not None:
            new_labels = torch.full((batch, total), -100, dtype=labels.dtype, device=device)
            new_labels[rows, starts[rows, cols]] = labels[rows, cols]
        return SliMEPreparedInputs(
            inputs_embeds=out,
            attention_mask=new_mask,
            position_ids=position_ids,
            input_ids=ids,
            labels=new_labels,
            truncated_positions=truncated,
        )

    def _embed_assembled(self, input_ids: torch.LongTensor, prompt_embeds: torch.Tensor, cache) -> torch.Tensor:
        """Embeddings of the ids `generate` feeds: `input_ids` continue the cache, so they sit at positions
        `cache length ...`; those inside the assembled prompt take its embeddings (image features included), the
        rest (generated or candidate tokens) their token embeddings."""
        past = int(cache.get_seq_length()) if cache is not None else 0
        inside = max(0, min(prompt_embeds.shape[1], past + input_ids.shape[1]) - past)
        if not inside:
            return self.embed_tokens(input_ids)
        prompt_part = prompt_embeds[:, past : past + inside]
        if inside == input_ids.shape[1]:
            return prompt_part
        embeds = self.embed_tokens(input_ids[:, inside:])
        return torch.cat([prompt_part.to(embeds.device, embeds.dtype), embeds], dim=1)

    def _pad_id(self) -> int:
        for config in (self.config, self.config.text_config):
            if getattr(config, "pad_token_id", None) is not None:
                return int(config.pad_token_id)
        return 0

    @staticmethod
    def _check_cut_outside_images(
        unpadded_starts: torch.Tensor, is_image: torch.Tensor, image_features: list[torch.Tensor], max_length: int
    ) -> None:
        """Raises when a cut at `max_length` would fall inside an image block or drop one."""
        if not image_features:
            return
        image_rows, image_cols = is_image.nonzero(as_tuple=True)
        block_starts = unpadded_starts[image_rows, image_cols].tolist()
        for index, (row, start) in enumerate(zip(image_rows.tolist(), block_starts)):
            end = start + image_features[index].shape[0]
            if end > max_length:
                raise ValueError(
                    f"row {row}: cutting the assembled sequence at training_max_length={max_length} would "
                    f"{'fall inside' if start < max_length else 'drop'} image {index} (positions {start}-{end - 1}); "
                    "shorten the text before the image or raise the limit"
                )

    @_cache_kwarg_renamed
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_sizes: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        router_top_p: float | None = None,
        padding_side: str | None = None,
        cache: Any = None,
        return_dict: bool | None = None,
        assembled_prompt_embeds: torch.FloatTensor | None = None,
        **kwargs,
    ) -> SliMEModelOutputWithPast | tuple:
        """Runs the vision path (if `pixel_values`), assembles the LLM input and runs the text model.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch, length)`): prompts with one image token per image.
            pixel_values (`torch.FloatTensor` of shape `(num_images, max_views, 3, 336, 336)`, *optional*).
            image_sizes (`torch.LongTensor` of shape `(num_images, 2)`, *optional*): (height, width) per image, as
                the processor returned them.
            attention_mask (`torch.Tensor` of shape `(batch, length)`, *optional*): padding mask of `input_ids`.
            inputs_embeds (`torch.FloatTensor`, *optional*): an already assembled sequence (instead of `input_ids`).
            labels (`torch.LongTensor`, *optional*): training labels aligned with `input_ids`.
            router_top_p (`float`, *optional*): overrides `config.router_top_p` for this call.
            padding_side (`str`, *optional*): side of the re-padding of the assembled rows (`"left"` by default,
                `"right"` when labels are given).
            return_dict (`bool`, *optional*): a [`SliMEModelOutputWithPast`] (default: `config.return_dict`) or a
                tuple.
            assembled_prompt_embeds (`torch.FloatTensor` of shape `(batch, assembled_length, hidden)`, *optional*):
                set by `generate`: the assembled prompt whose ids are `input_ids`' leading positions (see
                [`~SliMEForConditionalGeneration.generate`]).
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        cache = cache if cache is not None else past_key_values
        prepared = None  # set where this call assembles the prompt; decoding steps only embed what they feed
        if assembled_prompt_embeds is not None and input_ids is not None:
            inputs_embeds = self._embed_assembled(input_ids, assembled_prompt_embeds, cache)
        elif inputs_embeds is not None:
            if input_ids is not None or pixel_values is not None:
                raise ValueError("pass either input_ids (+ pixel_values) or inputs_embeds, not both")
        else:
            max_length = self.config.training_max_length if labels is not None else None
            prepared = self.prepare_multimodal_inputs(
                input_ids, attention_mask, pixel_values, image_sizes, labels, router_top_p, padding_side, max_length
            )
            if position_ids is None:
                position_ids = prepared.position_ids
            if max_length is None:
                prepared.truncated_positions = None
            elif bool(prepared.truncated_positions.any()):
                logger.warning_once(
                    f"training rows longer than training_max_length={max_length} assembled positions are cut at the "
                    "end (the number of positions cut per row is in outputs.truncated_positions)"
                )
            inputs_embeds, attention_mask, labels = prepared.inputs_embeds, prepared.attention_mask, prepared.labels
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            return_dict=True,
            **{_cache_argument_name(self.language_model): cache},
            **kwargs,
        )
        output = SliMEModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            **_cache_output(outputs),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            attention_mask=attention_mask,
            labels=labels,
            **(_prepared_fields(prepared) if prepared is not None else {}),
        )
        return output if return_dict else output.to_tuple()


class _PromptStreamer:
    """Feeds a streamer the caller's prompt instead of the assembled one (whose image positions hold an id no
    tokenizer can decode); everything after the prompt passes through unchanged."""

    def __init__(self, streamer, prompt_ids: torch.LongTensor):
        self.streamer = streamer
        self.prompt_ids = prompt_ids
        self.prompt_sent = False

    def put(self, value):
        if not self.prompt_sent:
            self.prompt_sent = True
            value = self.prompt_ids.cpu()
        self.streamer.put(value)

    def end(self):
        self.streamer.end()


class _ImageIdAwareProcessors(LogitsProcessorList):
    """Runs logits processors on scores widened to the image id, the first id after the vocabulary: the assembled
    ids hold it at every image position, and processors that index scores by the ids seen so far
    (`repetition_penalty`, ...) must be able to address it. The extra columns are -inf and dropped afterwards."""

    def __init__(self, processors: LogitsProcessorList, image_token_id: int):
        super().__init__(processors)
        self.image_token_id = image_token_id
        self.prompt_has_image_id: bool | None = None  # settled at the first step: generated ids are never the image id

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.FloatTensor:
        width = scores.shape[-1]
        if width > self.image_token_id or not len(self):
            return super().__call__(input_ids, scores, **kwargs)
        if self.prompt_has_image_id is None:
            self.prompt_has_image_id = bool((input_ids == self.image_token_id).any())
        if not self.prompt_has_image_id:
            return super().__call__(input_ids, scores, **kwargs)
        extra = scores.new_full((*scores.shape[:-1], self.image_token_id + 1 - width), float("-inf"))
        return super().__call__(input_ids, torch.cat([scores, extra], dim=-1), **kwargs)[..., :width]


class _CandidatesWithoutImageIds:
    """Wraps a candidate generator (prompt lookup, assisted decoding) so that no candidate is the image id: prompt
    lookup copies continuations out of the assembled prompt, whose image positions hold it."""

    def __init__(self, generator, image_token_id: int):
        self.generator = generator
        self.image_token_id = image_token_id

    def __getattr__(self, name):
        return getattr(self.generator, name)

    def get_candidates(self, input_ids: torch.LongTensor, *args, **kwargs):
        candidates, logits = self.generator.get_candidates(input_ids, *args, **kwargs)
        new = candidates[:, input_ids.shape[1] :]
        is_image = (new == self.image_token_id).any(0)
        if bool(is_image.any()):
            keep = int(is_image.float().argmax())
            candidates = candidates[:, : input_ids.shape[1] + keep]
            logits = logits[:, :keep] if logits is not None else None
        return candidates, logits


def _reusable_cache_length(cache, prepared: SliMEPreparedInputs) -> int:
    """How many leading positions of `cache` hold exactly the sequence `prepared` would feed the text model.

    The cache records what it was filled with (`slime_sequence`: the ids it covers, `slime_prompt_embeds`: the
    assembled prompt embeddings). Routing reads the whole prompt, so a later turn may keep other local tokens than
    the one that filled the cache: the prefix ends at the first position whose id or embedding differs.
    """
    cached = int(cache.get_seq_length())
    old_ids = getattr(cache, "slime_sequence", None)
    old_embeds = getattr(cache, "slime_prompt_embeds", None)
    new_ids, new_embeds = prepared.input_ids, prepared.inputs_embeds
    if cached == 0 or old_ids is None or old_ids.shape[0] != new_ids.shape[0]:
        return 0
    length = min(cached, old_ids.shape[1], new_ids.shape[1] - 1)  # at least one position is fed again
    same = (old_ids[:, :length] == new_ids[:, :length].to(old_ids.device)).all(0)
    span = min(length, old_embeds.shape[1])
    same[:span] &= (old_embeds[:, :span] == new_embeds[:, :span].to(old_embeds.device)).all(-1).all(0)
    return length if bool(same.all()) else int((~same).float().argmax())


class SliMEGrowingCacheLayer(DynamicLayer):
    """A full-attention cache layer that writes each step's keys and values into spare room of a buffer.

    `DynamicLayer` concatenates at every step, copying the whole cache into a fresh allocation: for a batch of long
    multimodal prompts (8 rows of 1,500 positions: about 50 MB per layer and tensor) that copy, and on a CPU the page
    faults of the fresh allocation, cost more than the step's matrix products. Here `keys` and `values` are views of
    the filled part of buffers that grow by a quarter of their length when full (the attention reads the views as
    they are). Anything that replaces `keys` (beam reordering, batch selection, offloading) is taken over as a new
    buffer at the next update; `crop` keeps a view, and the next update writes over the cropped positions.
    """

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length, end = self.get_seq_length(), self.get_seq_length() + key_states.shape[-2]
        if not self._fits(end, key_states):
            self._take_over(end, key_states, value_states)
        self._key_buffer[..., length:end, :] = key_states
        self._value_buffer[..., length:end, :] = value_states
        self.keys, self.values = self._key_buffer[..., :end, :], self._value_buffer[..., :end, :]
        return self.keys, self.values

    def _fits(self, needed: int, key_states: torch.Tensor) -> bool:
        """Whether `keys` is still a view of this layer's buffer, with room for `needed` positions."""
        buffer = getattr(self, "_key_buffer", None)
        return (
            buffer is not None
            and needed <= buffer.shape[-2]
            and buffer.shape[:-2] == key_states.shape[:-2]
            and self.keys.data_ptr() == buffer.data_ptr()
            and self.keys.stride() == buffer.stride()
        )

    def _take_over(self, needed: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """New zeroed buffers shaped like the states, with room for `needed` positions and a quarter more, holding
        the current keys and values."""
        capacity = needed + max(64, needed // 4)
        length = self.get_seq_length()
        self._key_buffer = key_states.new_zeros(*key_states.shape[:-2], capacity, key_states.shape[-1])
        self._value_buffer = value_states.new_zeros(*value_states.shape[:-2], capacity, value_states.shape[-1])
        if length:
            self._key_buffer[..., :length, :] = self.keys
            self._value_buffer[..., :length, :] = self.values

    def reset(self) -> None:
        """Empties the layer (its buffers are dropped, as `DynamicLayer` drops its tensors)."""
        self.keys = self.values = self._key_buffer = self._value_buffer = None
        self.is_initialized = False


def growing_cache(text_config) -> Any | None:
    """A `DynamicCache` whose layers are [`SliMEGrowingCacheLayer`]s, or None where the text model's layers are not
    all plain full-attention layers (sliding windows and other layouts keep transformers' own cache)."""
    cache = DynamicCache(config=text_config)
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        return None
    cache.layers = [SliMEGrowingCacheLayer() for _ in layers]
    return cache


def _merge_row_caches(row_caches: list, lengths: list[int], text_config) -> Any | None:
    """One left-padded [`growing_cache`] holding each row's cache at the end of its row (zeros before: padding,
    which the attention mask hides), or None where a cache layer is not a plain full-attention `DynamicLayer`
    (sliding windows, quantized or static layers keep their own layout, which a merge would break)."""
    merged = growing_cache(text_config)
    if merged is None or any(type(layer) is not DynamicLayer for cache in row_caches for layer in cache.layers):
        return None
    total, rows = max(lengths), len(row_caches)
    for index, layer in enumerate(merged.layers):
        first = row_caches[0].layers[index]
        layer.lazy_initialization(first.keys, first.values)
        layer._take_over(total, first.keys.expand(rows, -1, -1, -1), first.values.expand(rows, -1, -1, -1))
        for row, (cache, length) in enumerate(zip(row_caches, lengths)):
            rows_layer = cache.layers[index]
            layer._key_buffer[row, :, total - length : total] = rows_layer.keys[0]
            layer._value_buffer[row, :, total - length : total] = rows_layer.values[0]
            rows_layer.keys = rows_layer.values = None  # freed as the merge goes: at most one layer is held twice
        layer.keys, layer.values = layer._key_buffer[..., :total, :], layer._value_buffer[..., :total, :]
    return merged


def _is_trl_fused_forward(forward: Any) -> bool:
    """Whether `forward` is the fused LM head that trl (>= 1.15) installs on a model (`trl.trainer.utils`)."""
    code = getattr(getattr(forward, "__func__", forward), "__code__", None)
    return code is not None and code.co_name == "_fused_forward" and "fused_lm_head" in code.co_varnames


def _next_token_scores(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """trl's per-token fields for assembled logits and labels: log-probability of each next-token label (with
    gradient), entropy and top-1 (without), and the target mask; zero / False where the label is -100."""
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:].to(logits.device)
    mask = shift_labels != -100
    log_z = shift_logits.logsumexp(-1)
    target = shift_logits.gather(-1, shift_labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    log_probs = (target - log_z).masked_fill(~mask, 0.0)
    with torch.no_grad():
        probs = (shift_logits - log_z.unsqueeze(-1)).exp()
        entropy = (log_z - (probs * shift_logits).sum(-1)).masked_fill(~mask, 0.0)
        is_top1 = (shift_logits.argmax(-1) == shift_labels) & mask
    return {"log_probs": log_probs, "entropy": entropy, "is_top1": is_top1, "label_mask": mask}


class SliMEForConditionalGeneration(SliMEPreTrainedModel, GenerationMixin):
    """SliME with its language-model head: `forward` for logits and loss, `generate` for answers.

    `generate` runs the vision path once, builds the compacted left-padded input and its attention mask, decodes
    with the KV cache, and returns the caller's `input_ids` followed by the new ids, so
    `processor.batch_decode(out[:, inputs["input_ids"].shape[1]:])` is the answer.
    """

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    # The same modules named from this class (the quantizers match names from the start of a module's path).
    _keep_in_fp32_modules = [f"model.{name}" for name in SliMEModel._keep_in_fp32_modules]
    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: SliMEConfig):
        super().__init__(config)
        self.model = SliMEModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()
        if getattr(config, "tie_word_embeddings", False) and isinstance(getattr(self, "_tp_plan", None), dict):
            # A tied lm_head shares its tensor with embed_tokens: both must be sharded along the vocabulary.
            self._tp_plan = {"model.language_model.embed_tokens": "embedding_rowwise", **self._tp_plan}

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def __setattr__(self, name: str, value: Any) -> None:
        # trl (>= 1.15) replaces `forward` with a fused LM head that scores the backbone's hidden states against labels
        # aligned with `input_ids`. SliME's hidden states are aligned with the assembled sequence (each image token
        # becomes its image's block), so that head would pair the wrong positions; the model serves
        # `fused_lm_head=True` in its own forward instead, and keeps it.
        if name == "forward" and _is_trl_fused_forward(value):
            logger.info("SliME serves trl's fused_lm_head=True calls in its own forward; trl's patch is not installed")
            return
        super().__setattr__(name, value)

    def get_image_features(self, *args, **kwargs) -> SliMEImageFeatures | tuple:
        """See [`SliMEModel.get_image_features`]."""
        return self.model.get_image_features(*args, **kwargs)

    @_cache_kwarg_renamed
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_sizes: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        router_top_p: float | None = None,
        padding_side: str | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache: Any = None,
        return_dict: bool | None = None,
        assembled_prompt_embeds: torch.FloatTensor | None = None,
        fused_lm_head: bool = False,
        **kwargs,
    ) -> SliMECausalLMOutputWithPast | tuple:
        """Logits (and the loss when `labels` are given) over the assembled sequence.

        `fused_lm_head=True` (trl's SFTTrainer protocol, with `labels`) also returns `log_probs`, `entropy`, `is_top1`
        and `label_mask` over the assembled sequence's next-token labels; trl sums them, so its loss is this loss.

        Args: as [`SliMEModel.forward`], plus `logits_to_keep` (compute logits for the last N positions only).
        The logits are aligned with the ASSEMBLED sequence (`outputs.attention_mask`), not with `input_ids`. With
        `return_dict=False` (or `config.return_dict=False`) a tuple is returned, the loss (if any) then the logits
        first, as for every transformers model.

        Example:

        ```python
        >>> outputs = model(**processor(images=image, text=prompt, return_tensors="pt"))
        >>> outputs.logits[:, -1].argmax(-1)  # next token
        >>> outputs.image_token_budget  # per image: global, separator, local kept of local total
        ```
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        if fused_lm_head and (labels is None or kwargs.get("shift_labels") is not None):
            raise ValueError("fused_lm_head=True scores labels aligned with input_ids: pass labels (not shift_labels)")
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            image_sizes=image_sizes,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            router_top_p=router_top_p,
            padding_side=padding_side,
            return_dict=True,
            assembled_prompt_embeds=assembled_prompt_embeds,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits,
                labels=outputs.labels,
                vocab_size=self.config.text_config.vocab_size,
                num_items_in_batch=num_items_in_batch,
            )
        output = SliMECausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            **_cache_output(outputs),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            attention_mask=outputs.attention_mask,
            selected_indices=outputs.selected_indices,
            image_token_budget=outputs.image_token_budget,
            truncated_positions=outputs.truncated_positions,
            **_image_outputs_field(getattr(outputs, "image_outputs", None)),
            **(_next_token_scores(logits, outputs.labels) if fused_lm_head else {}),
        )
        return output if return_dict else output.to_tuple()

    def _get_logits_processor(self, *args, **kwargs) -> LogitsProcessorList:
        return _ImageIdAwareProcessors(super()._get_logits_processor(*args, **kwargs), self.config.image_token_id)

    def _get_candidate_generator(self, *args, **kwargs):
        generator = super()._get_candidate_generator(*args, **kwargs)
        image_token_id = self.config.image_token_id
        if isinstance(getattr(generator, "vocab_size", None), int) and generator.vocab_size <= image_token_id:
            # Prompt lookup checks each token it copies out of the prompt against logits `vocab_size` wide; the image
            # id (the first id after the vocabulary) must be addressable there. The wrapper then cuts before it.
            generator.vocab_size = image_token_id + 1
        return _CandidatesWithoutImageIds(generator, image_token_id)

    def _check_assistant(self, assistant_model) -> None:
        if assistant_model is None:
            return
        config = getattr(assistant_model, "config", None)
        if getattr(config, "model_type", None) != self.config.model_type:
            raise ValueError(
                "assisted decoding needs a SliME assistant: the assistant is handed the assembled prompt (image "
                "positions hold the image features and the out-of-vocabulary image id), which a text-only model "
                f"cannot read; got a {type(assistant_model).__name__}. Use prompt_lookup_num_tokens, or a SliME model."
            )
        if config.text_config.hidden_size != self.config.text_config.hidden_size:
            raise ValueError(
                f"the assistant's text hidden size {config.text_config.hidden_size} differs from this model's "
                f"{self.config.text_config.hidden_size}: it cannot read this model's assembled prompt embeddings"
            )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_sizes: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        router_top_p: float | None = None,
        prefill_rows_separately: bool | None = None,
        **kwargs,
    ):
        """Generates answers; returns `input_ids` followed by the new ids (or a `GenerateOutput` whose `sequences`
        are, with `return_dict_in_generate=True`; each prompt repeated once per returned sequence).

        The prompt is assembled once ([`~SliMEModel.prepare_multimodal_inputs`]) and handed to
        [`~generation.GenerationMixin.generate`] as the assembled ids (the image token id at every image position)
        with the assembled embeddings as a model argument (`assembled_prompt_embeds`, repeated per returned sequence
        like any model argument), so logits processors (`repetition_penalty`, ...), prompt lookup and assisted
        decoding see the prompt's text, and every forward takes the prompt's embeddings for the positions it feeds.
        Consequences:

        - `max_length` counts assembled positions (text plus image tokens); prefer `max_new_tokens`.
        - A streamer is fed the caller's `input_ids` as the prompt (or skips it, with `skip_prompt=True`).
        - A cache from an earlier turn (`cache=`, or `past_key_values=` as transformers before 5.25 names it) is
          reused only for the prefix whose assembled embeddings are unchanged: the router reads the whole prompt, so
          a longer conversation may keep other local tokens; the rest of the cache is dropped and recomputed.
        - With `return_dict_in_generate=True`, the output also carries `image_token_budget` and `selected_indices`
          (per image, as on the forward output).
        - Without a cache passed in, decoding one sequence per prompt uses a `DynamicCache` of
          [`SliMEGrowingCacheLayer`]s (each step written into spare room, not a copy of the whole cache); beam
          search, assistants and other cache implementations use transformers' own caches.

        Args:
            input_ids, pixel_values, image_sizes, attention_mask: as returned by [`SliMEProcessor`] (padding on
                either side; the assembled rows are re-padded on the left).
            router_top_p (`float`, *optional*): the router's top-p for this call (never a bare `top_p`: that is
                nucleus sampling).
            prefill_rows_separately (`bool`, *optional*): prefill each row of a padded batch on its own (no padding,
                no attention mask; the rows' caches are then merged and decoded together) instead of as one padded
                batch. By default on when the assembled rows differ in length and the decoding allows it (one
                sequence per prompt, no assistant, the default dynamic cache): padded prefill spends compute on
                padding and runs a slower masked attention, which on a CPU costs more than batching saves. Set it
                to `False` on a GPU when many short rows of similar length are batched.
            kwargs: any argument of [`~generation.GenerationMixin.generate`].
        """
        if kwargs.get("inputs_embeds") is not None or kwargs.get("assembled_prompt_embeds") is not None:
            # An already assembled prompt: a round of this model as its own assistant, or a caller's embeddings.
            if pixel_values is not None:
                raise ValueError("pass either pixel_values (with input_ids) or inputs_embeds, not both")
            return super().generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if input_ids is None:
            raise ValueError("generate needs input_ids (from the processor)")
        self._check_assistant(kwargs.get("assistant_model"))
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        prepared = self.model.prepare_multimodal_inputs(
            input_ids, attention_mask, pixel_values, image_sizes, router_top_p=router_top_p, padding_side="left"
        )
        if kwargs.get("cache") is not None and not GENERATE_TAKES_CACHE:
            kwargs["past_key_values"] = kwargs.pop("cache")  # the newer name, accepted on older transformers too
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None and hasattr(cache, "get_seq_length"):
            reusable, cached = _reusable_cache_length(cache, prepared), int(cache.get_seq_length())
            if reusable < cached:
                if reusable and hasattr(cache, "crop"):
                    cache.crop(reusable - cached)  # a negative count removes that many positions from the end
                else:
                    cache.reset()
        plain = cache is None and self._decodes_one_sequence_per_prompt(kwargs)
        if plain:
            if self._prefills_rows_separately(prepared, prefill_rows_separately, kwargs):
                cache = self._prefill_rows(prepared)
            if cache is None:
                cache = growing_cache(self.config.text_config)
            if cache is not None:
                kwargs["cache" if GENERATE_TAKES_CACHE else "past_key_values"] = cache
        elif prefill_rows_separately:
            raise ValueError(
                "prefill_rows_separately=True needs one sequence per prompt, no assistant or prompt lookup, the "
                "dynamic cache, no prefill_chunk_size and no cache passed in"
            )
        if kwargs.get("streamer") is not None:
            kwargs["streamer"] = _PromptStreamer(kwargs["streamer"], input_ids)
        result = super().generate(
            input_ids=prepared.input_ids,
            attention_mask=prepared.attention_mask,
            assembled_prompt_embeds=prepared.inputs_embeds,
            **kwargs,
        )
        sequences = result if torch.is_tensor(result) else result.sequences
        new_ids = sequences[:, prepared.input_ids.shape[1] :]
        copies = sequences.shape[0] // input_ids.shape[0]
        answer = torch.cat([input_ids.repeat_interleave(copies, dim=0), new_ids.to(input_ids.device)], dim=1)
        filled = cache
        if not torch.is_tensor(result):
            filled = getattr(result, "cache", None) or getattr(result, "past_key_values", None) or filled
        if filled is not None and copies == 1:
            filled.slime_sequence = sequences
            filled.slime_prompt_embeds = prepared.inputs_embeds
        if torch.is_tensor(result):
            return answer
        result.sequences = answer
        result["image_token_budget"] = prepared.image_token_budget or []
        result["selected_indices"] = prepared.selected_indices or []
        return result

    def _decoding_setting(self, kwargs: dict, name: str) -> Any:
        config = kwargs.get("generation_config") or self.generation_config
        return kwargs.get(name, getattr(config, name, None))

    def _decodes_one_sequence_per_prompt(self, kwargs: dict) -> bool:
        """Whether `generate` decodes one sequence per prompt with the dynamic cache and no candidates: then it
        supplies the cache itself ([`growing_cache`]), and may prefill the rows one by one."""
        setting = partial(self._decoding_setting, kwargs)
        return (
            (setting("num_beams") or 1) == 1
            and (setting("num_return_sequences") or 1) == 1
            and setting("use_cache") is not False
            and setting("cache_implementation") in (None, "dynamic")
            and setting("prefill_chunk_size") is None
            and setting("assistant_model") is None
            and setting("prompt_lookup_num_tokens") is None
        )

    def _prefills_rows_separately(self, prepared: SliMEPreparedInputs, requested: bool | None, kwargs: dict) -> bool:
        """Whether `generate` prefills the rows one by one (see its `prefill_rows_separately`)."""
        mask = prepared.attention_mask
        if requested is False or mask is None or mask.shape[0] < 2:
            return False
        if self._decoding_setting(kwargs, "output_attentions") or self._decoding_setting(
            kwargs, "output_hidden_states"
        ):
            if requested:
                raise ValueError("prefill_rows_separately=True cannot return the padded prefill's attentions or states")
            return False
        return bool(requested) or not bool(mask.bool().all())

    def _prefill_rows(self, prepared: SliMEPreparedInputs) -> Any | None:
        """Runs the text model on each assembled row but its last position, without padding, and merges the rows'
        caches into one left-padded cache: `generate` then feeds every row's last position together and decodes
        the rows as one batch. Each row's prefill is exactly its single run's. None where the text model's cache
        cannot be merged (the padded batch is prefilled instead)."""
        from transformers.cache_utils import DynamicCache

        mask = prepared.attention_mask.bool()
        lengths = mask.sum(1).tolist()
        total = mask.shape[1]
        if not all(bool(mask[row, total - length :].all()) for row, length in enumerate(lengths)):
            return None  # right padding (a text-only batch as the caller padded it): prefilled as it is
        caches = []
        for row, length in enumerate(lengths):
            if length < 2:
                return None  # nothing to prefill before the last position
            cache = DynamicCache(config=self.config.text_config)
            self.model.language_model(
                inputs_embeds=prepared.inputs_embeds[row : row + 1, total - length : total - 1],
                use_cache=True,
                **{_cache_argument_name(self.model.language_model): cache},
            )
            caches.append(cache)
        return _merge_row_caches(caches, [length - 1 for length in lengths], self.config.text_config)

    # -- loading ---------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """Loads a saved or converted SliME folder, or a checkpoint in the authors' `llava_llama` layout. The latter is
        read by the installed `slime_hf` package (`slime_hf.checkpoints.load_original_model`), which translates its
        config and weight names; a saved or converted folder never needs it."""
        path = str(pretrained_model_name_or_path) if pretrained_model_name_or_path is not None else None
        config_file = os.path.join(path, "config.json") if path else None
        if config_file and os.path.isfile(config_file) and kwargs.get("config") is None:
            try:
                with open(config_file, encoding="utf-8") as handle:
                    config_dict = json.load(handle)
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
                raise ValueError(f"{config_file} is not a readable JSON config: {error}") from error
            if not isinstance(config_dict, dict):
                raise ValueError(f"{config_file} holds a JSON {type(config_dict).__name__}, not a config object")
            model_type = config_dict.get("model_type")
            if model_type != SliMEConfig.model_type:
                try:
                    # The one import of the package from the remote code: only the authors' layout needs it.
                    from slime_hf.checkpoints import load_original_model
                except ImportError as error:
                    raise ValueError(
                        f"{config_file} has model_type {model_type!r}, not a saved SliME model "
                        f"({SliMEConfig.model_type!r}); a checkpoint in the authors' 'llava_llama' layout is read by "
                        "the slime_hf package, which is not installed here (install it, or load a converted repo)"
                    ) from error
                return load_original_model(cls, path, *model_args, **kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)


__all__ = [
    "SliMEPreTrainedModel",
    "SliMEModel",
    "SliMEForConditionalGeneration",
]
