"""Gated-MLP decoders whose layers have their own widths (structurally pruned models).

This file is self-contained on purpose: it imports only torch, transformers (and huggingface_hub,
which transformers itself needs) and the standard library, because the exporter copies it verbatim
next to the weights so that

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

loads a pruned model on a machine without the `compress` package. Importing it (which
`import compress` does) registers `pruned_llama` with `AutoConfig` / `AutoModelForCausalLM`, so the
same folder also loads without `trust_remote_code` when `compress` is importable.

Supported bases (`base_model_type`): llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text,
olmo2, granite (Phi-3 is unfused into a mistral base when it is loaded). The model is the stock base
decoder (`LlamaModel`, ..., `Gemma3TextModel`, `Olmo2Model`, `GraniteModel`) built from this config
(which carries the base config's own fields: Gemma's soft-capping and layer types, Granite's
multipliers, ...), whose q/k/v/o and gate/up/down linears are then replaced, layer by layer, by
linears of that layer's width; OLMo-2's q_norm/k_norm span the whole projection and are re-sized
with it. Everything else (norms, rotary embedding, Qwen3's and Gemma 3's q_norm/k_norm over
`head_dim`, masks, caches, attention kernels) is the base's own code, and the causal-LM forward is
the base's own (Gemma's final soft-capping, Granite's logits scaling).

Per layer i, with H = num_attention_heads_per_layer[i], K = num_key_value_heads_per_layer[i],
F = intermediate_size_per_layer[i], D = head_dim and E = hidden_size, the weight shapes are

    self_attn.q_proj [H*D, E]   self_attn.k_proj [K*D, E]   self_attn.v_proj [K*D, E]
    self_attn.o_proj [E, H*D]   mlp.gate_proj [F, E]   mlp.up_proj [F, E]   mlp.down_proj [E, F]

and each linear has a bias exactly when its `<name>_bias` flag is set (the exporter writes zero
biases for layers that had none). The scalar `num_attention_heads`, `num_key_value_heads` and
`intermediate_size` only size the throw-away dense scaffold; the per-layer lists are authoritative.
"""

import functools

from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    Gemma2ForCausalLM,
    Gemma2Model,
    Gemma3ForCausalLM,
    Gemma3TextModel,
    GemmaForCausalLM,
    GemmaModel,
    GenerationMixin,
    GraniteForCausalLM,
    GraniteModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    MistralModel,
    Olmo2Model,
    PreTrainedModel,
    Qwen2Model,
    Qwen3Model,
)
from transformers.utils import TRANSFORMERS_DYNAMIC_MODULE_NAME

__all__ = ["PrunedLlamaConfig", "PrunedLlamaForCausalLM", "PrunedLlamaPreTrainedModel", "build_pruned_decoder"]

# Base model_type -> the stock decoder (no LM head) whose layers get re-sized.
BASE_DECODER_CLASSES = {
    "llama": LlamaModel,
    "mistral": MistralModel,
    "qwen2": Qwen2Model,
    "qwen3": Qwen3Model,
    "gemma": GemmaModel,
    "gemma2": Gemma2Model,
    "gemma3_text": Gemma3TextModel,
    "olmo2": Olmo2Model,
    "granite": GraniteModel,
}

# Base model_type -> the stock causal-LM forward (reads self.model, self.lm_head, self.config): the
# bases that change the logits (soft-capping, scaling) keep their own; the rest share LLaMA's.
BASE_CAUSAL_LM_FORWARD = {
    "gemma": GemmaForCausalLM.forward,
    "gemma2": Gemma2ForCausalLM.forward,
    "gemma3_text": Gemma3ForCausalLM.forward,
    "granite": GraniteForCausalLM.forward,
}

# Bases whose q_norm / k_norm normalise the whole projection (width heads·head_dim), not one head.
WHOLE_PROJECTION_NORM_BASES = ("olmo2",)

ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")
LINEAR_NAMES = ATTENTION_LINEARS + MLP_LINEARS

# Qwen2/Qwen3 layer types are derived from these when `layer_types` is not given.
_QWEN_FAMILIES = ("qwen2", "qwen3")


@strict
class PrunedLlamaConfig(LlamaConfig):
    r"""Config of a LLaMA-family decoder with per-layer attention and MLP widths.

    Extra fields (beyond `LlamaConfig`):
        base_model_type: a key of BASE_DECODER_CLASSES — which stock decoder to build.
        num_attention_heads_per_layer: list[int], num_hidden_layers entries (query heads of layer i).
        num_key_value_heads_per_layer: list[int], num_hidden_layers entries; heads % kv_heads == 0.
        intermediate_size_per_layer: list[int], num_hidden_layers entries (MLP channels of layer i).
        q_proj_bias … down_proj_bias: bool, whether that linear carries a bias in every layer.
        sliding_window, use_sliding_window, max_window_layers, layer_types: copied from Mistral / Qwen
            bases (their decoders read them); unused for a LLaMA base.
    A list left out is filled from the matching scalar (a dense layer). `head_dim` should be given
    explicitly: after pruning `hidden_size // num_attention_heads` is usually not the head size.
    """

    model_type = "pruned_llama"

    base_model_type: str = "llama"
    num_attention_heads_per_layer: list[int] | None = None
    num_key_value_heads_per_layer: list[int] | None = None
    intermediate_size_per_layer: list[int] | None = None
    q_proj_bias: bool = False
    k_proj_bias: bool = False
    v_proj_bias: bool = False
    o_proj_bias: bool = False
    gate_proj_bias: bool = False
    up_proj_bias: bool = False
    down_proj_bias: bool = False
    sliding_window: int | None = None
    use_sliding_window: bool = False
    max_window_layers: int = 28
    layer_types: list[str] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        layers = self.num_hidden_layers
        if self.num_attention_heads_per_layer is None:
            self.num_attention_heads_per_layer = [self.num_attention_heads] * layers
        if self.num_key_value_heads_per_layer is None:
            self.num_key_value_heads_per_layer = [self.num_key_value_heads] * layers
        if self.intermediate_size_per_layer is None:
            self.intermediate_size_per_layer = [self.intermediate_size] * layers
        if self.layer_types is None and self.base_model_type in _QWEN_FAMILIES:
            self.layer_types = _qwen_layer_types(self.sliding_window, self.max_window_layers, layers)

    def validate_architecture(self):
        """Part of `@strict` validation: replaces LLaMA's `hidden_size % num_attention_heads` check,
        which pruned widths need not satisfy, with per-layer checks."""
        if self.base_model_type not in BASE_DECODER_CLASSES:
            raise ValueError(
                f"PrunedLlamaConfig.base_model_type must be one of {sorted(BASE_DECODER_CLASSES)}, "
                f"got {self.base_model_type!r}."
            )
        if self.head_dim is None or self.head_dim < 1:
            raise ValueError(f"PrunedLlamaConfig.head_dim must be a positive integer, got {self.head_dim!r}.")
        for name in ("num_attention_heads_per_layer", "num_key_value_heads_per_layer", "intermediate_size_per_layer"):
            _check_per_layer_list(name, getattr(self, name), self.num_hidden_layers)
        heads_and_kv = zip(self.num_attention_heads_per_layer, self.num_key_value_heads_per_layer)
        for layer, (heads, kv_heads) in enumerate(heads_and_kv):
            if heads % kv_heads != 0:
                raise ValueError(
                    f"PrunedLlamaConfig layer {layer}: {heads} query heads are not a multiple of "
                    f"{kv_heads} key/value heads (grouped-query attention needs heads % kv_heads == 0)."
                )

    def widths_of_layer(self, layer: int) -> tuple[int, int, int]:
        """(query heads, key/value heads, MLP channels) of decoder layer `layer`."""
        return (
            self.num_attention_heads_per_layer[layer],
            self.num_key_value_heads_per_layer[layer],
            self.intermediate_size_per_layer[layer],
        )


def _qwen_layer_types(sliding_window: int | None, max_window_layers: int, layers: int) -> list[str]:
    """Qwen2/Qwen3's rule: layers from `max_window_layers` on use the sliding window, if any."""
    return [
        "sliding_attention" if sliding_window is not None and layer >= max_window_layers else "full_attention"
        for layer in range(layers)
    ]


def _check_per_layer_list(name: str, values: list[int], num_hidden_layers: int) -> None:
    """Raise ValueError unless `values` has one positive entry per decoder layer."""
    if len(values) != num_hidden_layers:
        raise ValueError(
            f"PrunedLlamaConfig.{name} has {len(values)} entries but num_hidden_layers is {num_hidden_layers}."
        )
    empty_layers = [layer for layer, value in enumerate(values) if value < 1]
    if empty_layers:
        raise ValueError(
            f"PrunedLlamaConfig.{name} must be >= 1 in every layer; layers {empty_layers} have "
            f"{[values[layer] for layer in empty_layers]} (removing a whole attention or MLP block "
            "is not supported)."
        )


def _replacement_linear(old: nn.Linear, in_features: int, out_features: int, bias: bool) -> nn.Linear:
    """A fresh `nn.Linear` [out_features, in_features] on `old`'s device and dtype (meta while
    `from_pretrained` builds the model; the checkpoint fills it afterwards)."""
    return nn.Linear(in_features, out_features, bias=bias, device=old.weight.device, dtype=old.weight.dtype)


def _resize_attention(attention: nn.Module, config: PrunedLlamaConfig, heads: int, kv_heads: int) -> None:
    """Give one attention module H=`heads` query and K=`kv_heads` key/value heads of `config.head_dim`:
    q [H*D, E], k/v [K*D, E], o [E, H*D], and `num_key_value_groups` = H // K (read by repeat_kv / SDPA)."""
    hidden, head_dim = config.hidden_size, config.head_dim
    shapes = {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv_heads * head_dim),
        "v_proj": (hidden, kv_heads * head_dim),
        "o_proj": (heads * head_dim, hidden),
    }
    for name, (in_features, out_features) in shapes.items():
        old = getattr(attention, name)
        bias = getattr(config, f"{name}_bias")
        setattr(attention, name, _replacement_linear(old, in_features, out_features, bias))
    attention.head_dim = head_dim
    attention.num_key_value_groups = heads // kv_heads
    if config.base_model_type in WHOLE_PROJECTION_NORM_BASES:
        for name, width in (("q_norm", heads * head_dim), ("k_norm", kv_heads * head_dim)):
            norm = getattr(attention, name)
            norm.weight = nn.Parameter(norm.weight.new_ones(width))


def _resize_mlp(mlp: nn.Module, config: PrunedLlamaConfig, channels: int) -> None:
    """Give one gated MLP F=`channels`: gate/up [F, E], down [E, F], and `intermediate_size` = F."""
    hidden = config.hidden_size
    shapes = {"gate_proj": (hidden, channels), "up_proj": (hidden, channels), "down_proj": (channels, hidden)}
    for name, (in_features, out_features) in shapes.items():
        old = getattr(mlp, name)
        bias = getattr(config, f"{name}_bias")
        setattr(mlp, name, _replacement_linear(old, in_features, out_features, bias))
    mlp.intermediate_size = channels


def build_pruned_decoder(config: PrunedLlamaConfig) -> PreTrainedModel:
    """The stock decoder of `config.base_model_type`, sharing `config`, with every layer re-sized
    to its entry in the per-layer lists. Works under the meta device."""
    base = BASE_DECODER_CLASSES[config.base_model_type]
    if not base._supports_sdpa and config._attn_implementation == "sdpa":
        config._attn_implementation = "eager"  # Gemma 2: soft-capped attention has no SDPA kernel
    decoder = base(config)
    for index, layer in enumerate(decoder.layers):
        heads, kv_heads, channels = config.widths_of_layer(index)
        _resize_attention(layer.self_attn, config, heads, kv_heads)
        _resize_mlp(layer.mlp, config, channels)
    return decoder


class PrunedLlamaPreTrainedModel(PreTrainedModel):
    """Shared class attributes; weight init is `PreTrainedModel`'s default (as for the bases)."""

    config_class = PrunedLlamaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer",
                         "GemmaDecoderLayer", "Gemma2DecoderLayer", "Gemma3DecoderLayer", "Olmo2DecoderLayer",
                         "GraniteDecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _can_compile_fullgraph = True
    _supports_attention_backend = True


class PrunedLlamaForCausalLM(PrunedLlamaPreTrainedModel, GenerationMixin):
    """Causal LM over a pruned decoder: `model` (the re-sized stock decoder) + `lm_head` [V, E].

    Parameter names are those of the stock `*ForCausalLM`, so checkpoints map one to one.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: PrunedLlamaConfig):
        super().__init__(config)
        self.model = build_pruned_decoder(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @functools.wraps(LlamaForCausalLM.forward)  # the shared signature (generate() inspects it)
    def forward(self, *args, **kwargs):
        """The base's own causal-LM forward (logits, loss, cache, kwargs): LLaMA's, or Gemma's with
        its final soft-capping, or Granite's with its logits scaling."""
        base_forward = BASE_CAUSAL_LM_FORWARD.get(self.config.base_model_type, LlamaForCausalLM.forward)
        return base_forward(self, *args, **kwargs)


def _loaded_as_remote_code() -> bool:
    """True for the copy transformers imports from a model folder (`trust_remote_code=True`)."""
    return __name__.startswith(f"{TRANSFORMERS_DYNAMIC_MODULE_NAME}.")


def _register_with_auto_classes() -> None:
    """Map model_type "pruned_llama" to these classes and mark them for `auto_map` on save
    (so `save_pretrained` of a PrunedLlamaForCausalLM copies this file and writes `auto_map`)."""
    AutoConfig.register(PrunedLlamaConfig.model_type, PrunedLlamaConfig, exist_ok=True)
    AutoModelForCausalLM.register(PrunedLlamaConfig, PrunedLlamaForCausalLM, exist_ok=True)
    PrunedLlamaConfig.register_for_auto_class("AutoConfig")
    PrunedLlamaForCausalLM.register_for_auto_class("AutoModelForCausalLM")


# A remote-code copy leaves the registry alone: transformers registers what it loads itself, and
# must not replace the classes of an imported `compress` with the copy's.
if not _loaded_as_remote_code():
    _register_with_auto_classes()
