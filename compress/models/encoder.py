"""Adapter for transformer encoders: BERT family (incl. MiniLM), ViT, DeiT, DINOv2, CLIP text and
vision towers (and our head-pruned `pruned_*` versions of each).

Prunable groups:
  * attention head: ``head_dim`` rows of q, k and v (+ their biases) and ``head_dim`` columns of o;
  * FFN channel: one row of the up projection (+ bias) and one column of the down projection.
Widths are read from the modules, so the adapter describes pruned models correctly; which module
is which comes from the layout table in `compress.models.pruned_encoder` (shared with the reload
classes, which must stay self-contained).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from compress.errors import CompressError
from compress.models.pruned_encoder import LAYOUTS, PRUNED_MODEL_TYPES, NoHeads, get_submodule

ENCODER_MODEL_TYPES = tuple(LAYOUTS) + tuple(PRUNED_MODEL_TYPES)
IMAGE_FAMILIES = ("vit", "deit", "dinov2", "clip_vision_model")


@dataclass(frozen=True)
class EncoderWidths:
    """Widths of one encoder layer: attention heads and FFN channels."""

    heads: int
    intermediate: int


def encoder_family(model: nn.Module) -> str | None:
    """The stock model_type whose layout ``model``'s layers follow (None for a non-encoder)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in PRUNED_MODEL_TYPES:
        return PRUNED_MODEL_TYPES[model_type]
    if model_type in LAYOUTS:
        return model_type
    if model_type == "clip":
        raise CompressError("a CLIPModel holds two towers: load and prune its text or vision tower "
                            "(CLIPTextModel / CLIPVisionModel) on its own")
    return None


class EncoderAdapter:
    """Names the parts of an encoder and prices its prunable groups."""

    def __init__(self, model: nn.Module):
        family = encoder_family(model)
        if family is None:
            raise CompressError(f"no encoder adapter for {type(model).__name__} "
                                f"(model_type {getattr(model.config, 'model_type', None)!r})")
        self.family = family
        self.model = model
        self.config = model.config
        self.base = model.base_model
        self.layout = LAYOUTS[family]
        self.layers: nn.ModuleList = get_submodule(self.base, self.layout.layers)
        self.hidden_size = int(self.config.hidden_size)
        self.head_dim = int(getattr(self.config, "attention_head_dim", None)
                            or getattr(self.config, "head_dim", None)
                            or self.hidden_size // self.config.num_attention_heads)
        if family == "dinov2" and getattr(self.config, "use_swiglu_ffn", False):
            raise CompressError("DINOv2 with a SwiGLU FFN (use_swiglu_ffn) is not supported yet")

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def modality(self) -> str:
        """"image" for vision towers, "text" otherwise."""
        return "image" if self.family in IMAGE_FAMILIES else "text"

    # ------------------------------------------------------------------------------ modules
    def linear(self, layer_index: int, role: str) -> nn.Module:
        """The module of ``role`` (q, k, v, o, up, down) in layer ``layer_index``."""
        paths = {**self.layout.attention_linears, **self.layout.ffn_linears}
        return get_submodule(self.layers[layer_index], paths[role])

    def has_attention(self, layer_index: int) -> bool:
        """False once every head of the layer is pruned (its attention is then the o bias)."""
        return not isinstance(get_submodule(self.layers[layer_index], self.layout.attention), NoHeads)

    def attention_linears(self, layer_index: int) -> dict[str, nn.Linear]:
        """q, k, v, o of a layer that still has heads ({} otherwise)."""
        if not self.has_attention(layer_index):
            return {}
        return {role: self.linear(layer_index, role) for role in ("q", "k", "v", "o")}

    def ffn_linears(self, layer_index: int) -> dict[str, nn.Linear]:
        return {role: self.linear(layer_index, role) for role in ("up", "down")}

    def attention_consumer(self, layer_index: int) -> nn.Linear:
        """o: reads the concatenated head outputs, [..., heads·head_dim]."""
        return self.linear(layer_index, "o")

    def ffn_consumer(self, layer_index: int) -> nn.Linear:
        """down: reads the activated FFN channels, [..., intermediate]."""
        return self.linear(layer_index, "down")

    # ------------------------------------------------------------------------------- widths
    def widths(self, layer_index: int) -> EncoderWidths:
        heads = self.linear(layer_index, "q").out_features // self.head_dim if self.has_attention(layer_index) else 0
        return EncoderWidths(heads=heads, intermediate=self.linear(layer_index, "up").out_features)

    def all_widths(self) -> list[EncoderWidths]:
        return [self.widths(i) for i in range(self.num_layers)]

    # -------------------------------------------------------------------------------- costs
    def head_cost(self, layer_index: int) -> int:
        """Parameters removed with one head: q/k/v rows and biases, o columns: 4·D·E (+ 3·D)."""
        d, e = self.head_dim, self.hidden_size
        biases = sum(self.linear(layer_index, r).bias is not None for r in ("q", "k", "v")) if self.has_attention(layer_index) else 3
        return 4 * d * e + biases * d

    def channel_cost(self, layer_index: int) -> int:
        """One FFN channel: an up row (+ bias) and a down column: 2·E (+ 1)."""
        return 2 * self.hidden_size + int(self.linear(layer_index, "up").bias is not None)

    def encoder_linear_params(self) -> int:
        """Weights of q, k, v, o, up, down over all layers (the pruning ratio's denominator)."""
        total = 0
        for i in range(self.num_layers):
            for linear in {**self.attention_linears(i), **self.ffn_linears(i)}.values():
                total += linear.weight.numel()
        return total

    def param_counts(self) -> dict[str, int]:
        """Parameters by part (total, encoder_linear, attention, ffn, other)."""
        attention = ffn = 0
        for i in range(self.num_layers):
            layer = self.layers[i]
            attention += sum(p.numel() for p in get_submodule(layer, self.layout.attention).parameters())
            if not self.layout.o_in_attention:
                attention += sum(p.numel() for p in self.linear(i, "o").parameters())
            ffn += sum(p.numel() for role in ("up", "down") for p in self.linear(i, role).parameters())
        total = sum(p.numel() for p in {id(p): p for p in self.model.parameters()}.values())
        linear = self.encoder_linear_params()
        # Shared with the decoder reports: "decoder_linear" is the prunable-linear count.
        return {"total": total, "decoder_linear": linear, "encoder_linear": linear, "attention": attention,
                "ffn": ffn, "other": total - attention - ffn}

    def summary(self) -> dict:
        """What `compress inspect` prints."""
        widths = self.all_widths()
        return {
            "architecture": type(self.model).__name__,
            "family": self.family,
            "modality": self.modality,
            "layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "head_dim": self.head_dim,
            "params": self.param_counts(),
            "groups": [
                {"kind": "attention_head", "per_layer": widths[0].heads, "cost_params": self.head_cost(0),
                 "description": f"{self.head_dim} q/k/v rows + {self.head_dim} o columns"},
                {"kind": "ffn_channel", "per_layer": widths[0].intermediate, "cost_params": self.channel_cost(0),
                 "description": "up row + down column"},
            ],
            "layer_widths": [{"index": i, "heads": w.heads, "intermediate": w.intermediate} for i, w in enumerate(widths)],
        }


def is_encoder(model: nn.Module) -> bool:
    return encoder_family(model) is not None
