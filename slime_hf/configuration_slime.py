"""SliME model configuration."""

from __future__ import annotations

from collections.abc import Callable

from transformers import AutoConfig, CLIPVisionConfig, LlamaConfig, PreTrainedConfig


GLOBAL_ADAPTER_MODES = ("mixture", "mlp", "attention")
ROUTER_TYPES = ("cosine",)
POSITION_TABLE_DTYPES = ("float16", "bfloat16", "float32")

# CLIP-L/14 at 336 px, the vision tower of every SliME release.
CLIP_VIT_L_336 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}


def _sub_config(value: dict | PreTrainedConfig | None, default_type: str, default: Callable[[], PreTrainedConfig]):
    """A sub-config from a dict (its `model_type`, else `default_type`, picks the class), a config, or the default."""
    if isinstance(value, dict):
        value = dict(value)
        return AutoConfig.for_model(value.pop("model_type", default_type), **value)
    return default() if value is None else value


def _check_choices(
    global_adapter_mode: str,
    router_type: str,
    position_table_dtype: str,
    router_top_p: float,
    use_global_only: bool,
    use_local_only: bool,
    local_compressor_num_queries: int,
    training_max_length: int | None,
) -> None:
    """A `ValueError` naming the first SliME field whose value the model cannot run with."""
    if global_adapter_mode not in GLOBAL_ADAPTER_MODES:
        raise ValueError(f"global_adapter_mode must be one of {GLOBAL_ADAPTER_MODES}, got {global_adapter_mode!r}")
    if router_type not in ROUTER_TYPES:
        raise ValueError(f"router_type must be one of {ROUTER_TYPES}, got {router_type!r}")
    if position_table_dtype not in POSITION_TABLE_DTYPES:
        raise ValueError(f"position_table_dtype must be one of {POSITION_TABLE_DTYPES}, got {position_table_dtype!r}")
    if not 0.0 < float(router_top_p) <= 1.0:
        raise ValueError(f"router_top_p must be in (0, 1], got {router_top_p}")
    if use_global_only and use_local_only:
        raise ValueError("use_global_only and use_local_only cannot both be set")
    side = int(round(local_compressor_num_queries**0.5))
    if side * side != local_compressor_num_queries:
        raise ValueError(f"local_compressor_num_queries must be a square number, got {local_compressor_num_queries}")
    if training_max_length is not None and int(training_max_length) <= 0:
        raise ValueError(f"training_max_length must be positive, got {training_max_length}")


class SliMEConfig(PreTrainedConfig):
    r"""
    Configuration of a SliME model ([`SliMEForConditionalGeneration`]): a CLIP vision tower, a global adapter
    (gated mixture of an MLP expert and an attention expert over the global view), a local compressor (one
    resampler per local crop), a text-guided cosine router that keeps the local tokens most similar to the
    prompt, and any decoder-only text model.

    Args:
        text_config (`dict` or `PreTrainedConfig`, *optional*):
            Config of the language model (Llama in the releases). Any decoder the Auto classes know works.
        vision_config (`dict` or `CLIPVisionConfig`, *optional*):
            Config of the CLIP vision tower (CLIP-L/14-336 by default).
        image_token_id (`int`, *optional*, defaults to 32000):
            Id of the `<image>` placeholder: the first id after the text model's vocabulary. Embeddings are never
            resized; image positions are replaced before the embedding lookup.
        vision_feature_layer (`int`, *optional*, defaults to -2):
            Hidden-state index of the vision tower whose patch tokens (CLS dropped) feed the adapters.
        global_adapter_mode (`str`, *optional*, defaults to `"mixture"`):
            `"mixture"`: per-token softmax gate over the MLP expert and the attention expert (the releases);
            `"mlp"`: MLP expert only (training stage 1a); `"attention"`: attention expert only (stage 1b).
        global_adapter_num_queries (`int`, *optional*):
            Queries of the attention expert; defaults to the number of vision patches (576 for CLIP-L/14-336).
        local_compressor_num_queries (`int`, *optional*, defaults to 144):
            Tokens each local crop is compressed to (a square number).
        resampler_head_dim (`int`, *optional*, defaults to 128):
            Head width of both resamplers (heads = vision width // 128).
        resampler_layer_norm_eps (`float`, *optional*, defaults to 1e-6):
            Epsilon of the resamplers' layer norms.
        gate_noise_epsilon (`float`, *optional*, defaults to 0.01):
            Minimum standard deviation of the gate's training noise.
        gate_noise_uses_noise_weight (`bool`, *optional*, defaults to `False`):
            The released gates were trained with the noise scale computed from the gate weight itself; set to
            `True` to use the (otherwise unused) noise weight instead.
        router_type (`str`, *optional*, defaults to `"cosine"`):
            Text-guided router: summed cosine similarity of each local token with the prompt's token embeddings.
        router_top_p (`float`, *optional*, defaults to 0.95):
            Keep the smallest set of local tokens whose softmax mass reaches `router_top_p` (plus one). Can be
            overridden per call (`model(..., router_top_p=0.7)`, `model.generate(..., router_top_p=0.7)`).
        router_temperature (`float`, *optional*, defaults to 1.0):
            Softmax temperature of the router.
        router_noise_std (`float`, *optional*, defaults to 0.1):
            Gaussian noise added to the router scores in training mode.
        router_reads_answers (`bool`, *optional*, defaults to `True`):
            In training, route against the whole conversation (answers included, as the releases were trained);
            `False` routes against the prompt only (labels == -100 positions).
        separator_token_id (`int`, *optional*, defaults to 1919):
            Token whose embedding separates the global tokens from the kept local tokens.
        position_table_dtype (`str`, *optional*, defaults to `"float16"`):
            Dtype the resamplers' sin-cos position tables are rounded to (the original builds them in float16 and
            rounds the interpolated key table to float16); applied whatever dtype the model runs in.
        training_max_length (`int`, *optional*):
            Training: when labels are given, each assembled row (text + image tokens after routing) longer than this
            is cut at the end, as the original's `tokenizer_model_max_length`, and a cut that would fall inside an
            image block raises a `ValueError`. Set from `--model_max_length` by the training entry point; `None`
            (the default) never cuts.
        use_global_only (`bool`, *optional*, defaults to `False`):
            The language model sees only the 576 global tokens per image (training stages 1a/1b).
        use_local_only (`bool`, *optional*, defaults to `False`):
            The language model sees only the kept local tokens per image (training stage 2).
        tie_word_embeddings (`bool`, *optional*, defaults to `False`):
            Whether the output head shares the input embeddings.
    """

    model_type = "slime"
    sub_configs = {"text_config": AutoConfig, "vision_config": AutoConfig}

    def __init__(
        self,
        text_config: dict | PreTrainedConfig | None = None,
        vision_config: dict | PreTrainedConfig | None = None,
        image_token_id: int = 32000,
        vision_feature_layer: int = -2,
        global_adapter_mode: str = "mixture",
        global_adapter_num_queries: int | None = None,
        local_compressor_num_queries: int = 144,
        resampler_head_dim: int = 128,
        resampler_layer_norm_eps: float = 1e-6,
        gate_noise_epsilon: float = 0.01,
        gate_noise_uses_noise_weight: bool = False,
        router_type: str = "cosine",
        router_top_p: float = 0.95,
        router_temperature: float = 1.0,
        router_noise_std: float = 0.1,
        router_reads_answers: bool = True,
        separator_token_id: int = 1919,
        position_table_dtype: str = "float16",
        training_max_length: int | None = None,
        use_global_only: bool = False,
        use_local_only: bool = False,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        self.text_config = _sub_config(text_config, "llama", LlamaConfig)
        self.vision_config = _sub_config(vision_config, "clip_vision_model", lambda: CLIPVisionConfig(**CLIP_VIT_L_336))
        _check_choices(
            global_adapter_mode=global_adapter_mode,
            router_type=router_type,
            position_table_dtype=position_table_dtype,
            router_top_p=router_top_p,
            use_global_only=use_global_only,
            use_local_only=use_local_only,
            local_compressor_num_queries=local_compressor_num_queries,
            training_max_length=training_max_length,
        )

        self.image_token_id = image_token_id
        self.vision_feature_layer = vision_feature_layer
        self.global_adapter_mode = global_adapter_mode
        self.global_adapter_num_queries = global_adapter_num_queries
        self.local_compressor_num_queries = local_compressor_num_queries
        self.resampler_head_dim = resampler_head_dim
        self.resampler_layer_norm_eps = resampler_layer_norm_eps
        self.gate_noise_epsilon = gate_noise_epsilon
        self.gate_noise_uses_noise_weight = gate_noise_uses_noise_weight
        self.router_type = router_type
        self.router_top_p = router_top_p
        self.router_temperature = router_temperature
        self.router_noise_std = router_noise_std
        self.router_reads_answers = router_reads_answers
        self.separator_token_id = separator_token_id
        self.position_table_dtype = position_table_dtype
        self.training_max_length = None if training_max_length is None else int(training_max_length)
        self.use_global_only = use_global_only
        self.use_local_only = use_local_only
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def num_vision_patches(self) -> int:
        """Patch tokens per view (576 for CLIP-L/14 at 336 px)."""
        return (self.vision_config.image_size // self.vision_config.patch_size) ** 2

    @property
    def num_global_queries(self) -> int:
        """Queries of the global attention expert (defaults to the number of vision patches)."""
        return self.global_adapter_num_queries or self.num_vision_patches


__all__ = ["SliMEConfig"]
