"""Encoders whose layers have their own attention-head and FFN widths (head-pruned encoders).

transformers 5 removed `prune_heads`, `head_mask` and the `pruned_heads` reload path, so a
head-pruned BERT / ViT / DINOv2 / CLIP tower needs its own config and model class to load again.
This file is self-contained on purpose (torch, transformers and the standard library only): the
exporter copies it next to the weights so that

    AutoModel.from_pretrained(folder, trust_remote_code=True)

works on a machine without `compress`; importing it (which `import compress` does) registers the
`pruned_*` model types with `AutoConfig` / `AutoModel`, so the folder also loads without
`trust_remote_code` where `compress` is importable.

Each pruned class is the stock base model (`BertModel`, `ViTModel`, `DeiTModel`, `Dinov2Model`,
`CLIPTextModel`, `CLIPVisionModel`) built from the config's dense scalars, whose q/k/v/o and FFN
linears are then replaced layer by layer. Per layer i, with H = num_attention_heads_per_layer[i],
F = intermediate_size_per_layer[i], D = attention_head_dim and E = hidden_size:

    q, k, v [H*D, E]   o [E, H*D]   ffn up [F, E]   ffn down [E, F]      (all with biases)

A layer with H = 0 has no attention: the block that mixed tokens is replaced by its output bias
(exact: with no heads the attention output is the o bias alone), stored as `<o>.bias` [E].

A config with ``token_pruning`` (see token_pruning.py, copied beside this file) runs the forward of
`token_pruning.token_pruned_forward`: the same layers, with tokens dropped or merged between them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    BertConfig,
    BertModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    DeiTConfig,
    DeiTModel,
    Dinov2Config,
    Dinov2Model,
    ViTConfig,
    ViTModel,
)
from transformers.utils import TRANSFORMERS_DYNAMIC_MODULE_NAME

from .token_pruning import check_token_pruning, token_pruned_forward


# ------------------------------------------------------------------------------------ layouts
@dataclass(frozen=True)
class EncoderLayout:
    """Where the parts of one encoder layer live, as dotted paths from the layer (or, for
    ``layers``, from the base model). ``attention`` is the module whose forward splits heads; when
    ``o_in_attention`` it also applies the output projection (ViT, CLIP), otherwise the output
    projection is a sibling (BERT's ``attention.output.dense``). ``head_attributes`` are the
    attention-module attributes that hold its head count."""

    layers: str
    attention: str
    q: str
    k: str
    v: str
    o: str
    up: str
    down: str
    o_in_attention: bool
    head_attributes: tuple[str, ...]
    all_head_size_attribute: str | None = None

    @property
    def attention_linears(self) -> dict[str, str]:
        return {"q": self.q, "k": self.k, "v": self.v, "o": self.o}

    @property
    def ffn_linears(self) -> dict[str, str]:
        return {"up": self.up, "down": self.down}


_VIT_LIKE = dict(attention="attention", q="attention.q_proj", k="attention.k_proj", v="attention.v_proj",
                 o="attention.o_proj", up="mlp.fc1", down="mlp.fc2", o_in_attention=True,
                 head_attributes=("num_attention_heads",))
_CLIP = dict(layers="encoder.layers", attention="self_attn", q="self_attn.q_proj", k="self_attn.k_proj",
             v="self_attn.v_proj", o="self_attn.out_proj", up="mlp.fc1", down="mlp.fc2", o_in_attention=True,
             head_attributes=("num_heads",))

# Stock model_type -> layout of its layers.
LAYOUTS: dict[str, EncoderLayout] = {
    "bert": EncoderLayout(layers="encoder.layer", attention="attention.self", q="attention.self.query",
                          k="attention.self.key", v="attention.self.value", o="attention.output.dense",
                          up="intermediate.dense", down="output.dense", o_in_attention=False,
                          head_attributes=("num_attention_heads",), all_head_size_attribute="all_head_size"),
    "vit": EncoderLayout(layers="layers", **_VIT_LIKE),
    "deit": EncoderLayout(layers="layers", **_VIT_LIKE),
    "dinov2": EncoderLayout(layers="encoder.layer", **_VIT_LIKE),
    "clip_text_model": EncoderLayout(**_CLIP),
    "clip_vision_model": EncoderLayout(**_CLIP),
}


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


# ------------------------------------------------------------------------------ empty attention
class BiasOnly(nn.Module):
    """What a linear with no inputs computes: its bias, [..., E], for an input [..., 0 or more]."""

    def __init__(self, bias: torch.Tensor):
        super().__init__()
        self.bias = nn.Parameter(bias.detach().clone())

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(*hidden_states.shape[:-1], self.bias.shape[0])


class NoHeads(nn.Module):
    """An attention layer left with no heads. With ``bias`` (ViT, CLIP: the module also held the
    output projection) it returns that bias for every token, stored under the projection's own name
    ``o_name``; without (BERT) it returns an empty context [..., 0] that the sibling output projection,
    a `BiasOnly`, turns into its bias. Returns ``(output, None)`` like the stock attention modules."""

    def __init__(self, o_name: str | None = None, bias: torch.Tensor | None = None):
        super().__init__()
        self.o_name = o_name
        if o_name is not None:
            self.add_module(o_name, BiasOnly(bias))

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        if self.o_name is None:
            return hidden_states[..., :0], None
        return getattr(self, self.o_name)(hidden_states), None


def remove_attention(layer: nn.Module, layout: EncoderLayout, o_bias: torch.Tensor) -> None:
    """Replace the attention of ``layer`` by its output bias ``o_bias`` [E] (a layer with 0 heads)."""
    if layout.o_in_attention:
        o_name = layout.o.rsplit(".", 1)[1]
        set_submodule(layer, layout.attention, NoHeads(o_name, o_bias))
    else:
        set_submodule(layer, layout.attention, NoHeads())
        set_submodule(layer, layout.o, BiasOnly(o_bias))


def set_head_count(layer: nn.Module, layout: EncoderLayout, heads: int, head_dim: int) -> None:
    """Write the head count into the attention module's attributes (its forward reshapes with -1,
    but other code reads these)."""
    attention = get_submodule(layer, layout.attention)
    for name in layout.head_attributes:
        setattr(attention, name, heads)
    if layout.all_head_size_attribute:
        setattr(attention, layout.all_head_size_attribute, heads * head_dim)


def has_attention(layer: nn.Module, layout: EncoderLayout) -> bool:
    return not isinstance(get_submodule(layer, layout.attention), NoHeads)


# ------------------------------------------------------------------------------------- configs
_PER_LAYER_FIELDS = {
    "base_model_type": str,
    "attention_head_dim": int | None,
    "num_attention_heads_per_layer": list[int] | None,
    "intermediate_size_per_layer": list[int] | None,
}
# Not a width: kept when a config is rebuilt from its stock values.
_TOKEN_FIELDS = {"token_pruning": dict | None}


def dense_intermediate(config) -> int:
    """The FFN width of a dense layer: ``intermediate_size``, or DINOv2's ``hidden_size · mlp_ratio``."""
    return getattr(config, "intermediate_size", None) or int(config.hidden_size * config.mlp_ratio)


def _fill_per_layer(config) -> None:
    layers = config.num_hidden_layers
    if config.attention_head_dim is None:
        config.attention_head_dim = config.hidden_size // config.num_attention_heads
    if config.num_attention_heads_per_layer is None:
        config.num_attention_heads_per_layer = [config.num_attention_heads] * layers
    if config.intermediate_size_per_layer is None:
        config.intermediate_size_per_layer = [dense_intermediate(config)] * layers
    for name in ("num_attention_heads_per_layer", "intermediate_size_per_layer"):
        values = getattr(config, name)
        if len(values) != layers or any(int(v) < 0 for v in values):
            raise ValueError(f"{type(config).__name__}.{name} must list {layers} non-negative widths, got {values!r}")
    if any(v < 1 for v in config.intermediate_size_per_layer):
        raise ValueError(f"{type(config).__name__}.intermediate_size_per_layer: every layer needs an FFN channel")
    if config.token_pruning is not None:
        check_token_pruning(config.token_pruning, layers)


def _pruned_config_class(base: type, model_type: str, base_model_type: str) -> type:
    """A `@strict` subclass of the stock config ``base`` with the per-layer width fields."""

    def __post_init__(self, **kwargs):
        base.__post_init__(self, **kwargs)
        _fill_per_layer(self)

    namespace = {
        "__module__": __name__,
        "__qualname__": f"Pruned{base.__name__}",
        "__doc__": f"`{base.__name__}` with per-layer attention heads and FFN widths (see the module docstring).",
        "__annotations__": {**_PER_LAYER_FIELDS, **_TOKEN_FIELDS},
        "model_type": model_type,
        "base_model_type": base_model_type,
        "attention_head_dim": None,
        "num_attention_heads_per_layer": None,
        "intermediate_size_per_layer": None,
        "token_pruning": None,
        "__post_init__": __post_init__,
    }
    return strict(type(f"Pruned{base.__name__}", (base,), namespace))


def _resize_layer(layer: nn.Module, layout: EncoderLayout, config, heads: int, channels: int) -> None:
    """Replace the layer's linears by linears of ``heads`` heads and ``channels`` FFN channels, on
    the old linears' device and dtype (meta while `from_pretrained` builds the model)."""
    hidden, head_dim = config.hidden_size, config.attention_head_dim
    old = get_submodule(layer, layout.q).weight
    factory = {"device": old.device, "dtype": old.dtype}
    shapes = {layout.q: (hidden, heads * head_dim), layout.k: (hidden, heads * head_dim),
              layout.v: (hidden, heads * head_dim), layout.o: (heads * head_dim, hidden),
              layout.up: (hidden, channels), layout.down: (channels, hidden)}
    for path, (in_features, out_features) in shapes.items():
        bias = get_submodule(layer, path).bias is not None
        set_submodule(layer, path, nn.Linear(in_features, out_features, bias=bias, **factory))
    if heads == 0:
        remove_attention(layer, layout, torch.zeros(hidden, **factory))
    else:
        set_head_count(layer, layout, heads, head_dim)


def resize_encoder(model: nn.Module, config) -> None:
    """Give every layer of ``model`` (a stock base encoder) its per-layer widths from ``config``."""
    layout = LAYOUTS[config.base_model_type]
    layers = get_submodule(model, layout.layers)
    for index, layer in enumerate(layers):
        heads, channels = config.num_attention_heads_per_layer[index], config.intermediate_size_per_layer[index]
        dense = config.num_attention_heads, dense_intermediate(config)
        if (heads, channels) != dense or config.attention_head_dim * config.num_attention_heads != config.hidden_size:
            _resize_layer(layer, layout, config, heads, channels)


def _pruned_model_class(base: type, config_class: type) -> type:
    """The stock base model ``base`` whose layers are re-sized from the config after building."""

    def __init__(self, config, *args, **kwargs):
        base.__init__(self, config, *args, **kwargs)
        resize_encoder(self, config)
        self.post_init()

    input_names = _INPUT_NAMES[config_class.base_model_type]

    def forward(self, *args, **kwargs):
        if getattr(self.config, "token_pruning", None) is None:
            return base.forward(self, *args, **kwargs)
        kwargs.update(zip(input_names, args))
        family = self.config.base_model_type
        return token_pruned_forward(self, LAYOUTS[family], family, **kwargs)

    namespace = {"__module__": __name__, "__qualname__": f"Pruned{base.__name__}", "config_class": config_class,
                 "__init__": __init__, "forward": forward,
                 "__doc__": f"`{base.__name__}` with per-layer attention heads and FFN widths."}
    return type(f"Pruned{base.__name__}", (base,), namespace)


# stock model_type -> the forward's leading argument names (the token-pruned forward takes them by keyword)
_INPUT_NAMES = {"bert": ("input_ids", "attention_mask", "token_type_ids"), "vit": ("pixel_values",),
                "deit": ("pixel_values",), "dinov2": ("pixel_values",), "clip_text_model": ("input_ids", "attention_mask"),
                "clip_vision_model": ("pixel_values",)}

# stock model_type -> (pruned model_type, stock config, stock model)
_BASES = {
    "bert": ("pruned_bert", BertConfig, BertModel),
    "vit": ("pruned_vit", ViTConfig, ViTModel),
    "deit": ("pruned_deit", DeiTConfig, DeiTModel),
    "dinov2": ("pruned_dinov2", Dinov2Config, Dinov2Model),
    "clip_text_model": ("pruned_clip_text_model", CLIPTextConfig, CLIPTextModel),
    "clip_vision_model": ("pruned_clip_vision_model", CLIPVisionConfig, CLIPVisionModel),
}

PrunedBertConfig = _pruned_config_class(BertConfig, "pruned_bert", "bert")
PrunedViTConfig = _pruned_config_class(ViTConfig, "pruned_vit", "vit")
PrunedDeiTConfig = _pruned_config_class(DeiTConfig, "pruned_deit", "deit")
PrunedDinov2Config = _pruned_config_class(Dinov2Config, "pruned_dinov2", "dinov2")
PrunedCLIPTextConfig = _pruned_config_class(CLIPTextConfig, "pruned_clip_text_model", "clip_text_model")
PrunedCLIPVisionConfig = _pruned_config_class(CLIPVisionConfig, "pruned_clip_vision_model", "clip_vision_model")

PrunedBertModel = _pruned_model_class(BertModel, PrunedBertConfig)
PrunedViTModel = _pruned_model_class(ViTModel, PrunedViTConfig)
PrunedDeiTModel = _pruned_model_class(DeiTModel, PrunedDeiTConfig)
PrunedDinov2Model = _pruned_model_class(Dinov2Model, PrunedDinov2Config)
PrunedCLIPTextModel = _pruned_model_class(CLIPTextModel, PrunedCLIPTextConfig)
PrunedCLIPVisionModel = _pruned_model_class(CLIPVisionModel, PrunedCLIPVisionConfig)

# stock model_type -> (pruned config class, pruned model class)
PRUNED_CLASSES = {
    "bert": (PrunedBertConfig, PrunedBertModel),
    "vit": (PrunedViTConfig, PrunedViTModel),
    "deit": (PrunedDeiTConfig, PrunedDeiTModel),
    "dinov2": (PrunedDinov2Config, PrunedDinov2Model),
    "clip_text_model": (PrunedCLIPTextConfig, PrunedCLIPTextModel),
    "clip_vision_model": (PrunedCLIPVisionConfig, PrunedCLIPVisionModel),
}
PRUNED_MODEL_TYPES = {config.model_type: base for base, (config, _) in PRUNED_CLASSES.items()}


def _loaded_as_remote_code() -> bool:
    return __name__.startswith(f"{TRANSFORMERS_DYNAMIC_MODULE_NAME}.")


def _register_with_auto_classes() -> None:
    for config_class, model_class in PRUNED_CLASSES.values():
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModel.register(config_class, model_class, exist_ok=True)
        config_class.register_for_auto_class("AutoConfig")
        model_class.register_for_auto_class("AutoModel")


if not _loaded_as_remote_code():
    _register_with_auto_classes()
