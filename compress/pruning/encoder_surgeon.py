"""Physical slicing of encoder heads and FFN channels, and the config update that goes with it.

One surgeon for both groups: a head keeps its ``head_dim`` rows of q/k/v and columns of o; a
channel keeps its up row and down column. A layer that keeps no head has its attention replaced
by the o bias (exact). Indices refer to the layer as it is when the plan is applied.
"""

from __future__ import annotations

import torch

from compress.errors import PlanError
from compress.models.encoder import EncoderAdapter
from compress.models.pruned_encoder import remove_attention, set_head_count, set_submodule
from compress.plan import LayerPlan, PlanStep
from compress.pruning.surgeon import _check_indices, _head_rows, _sliced_linear


def slice_heads(adapter: EncoderAdapter, layer_index: int, keep_heads: list[int]) -> None:
    """Keep the heads ``keep_heads`` (sorted, unique) of layer ``layer_index``; [] removes the attention."""
    layer, layout = adapter.layers[layer_index], adapter.layout
    heads = adapter.widths(layer_index).heads
    if not keep_heads:
        remove_attention(layer, layout, adapter.linear(layer_index, "o").bias.detach().clone())
        return
    _check_indices("keep_heads", keep_heads, heads, layer_index)
    rows = _head_rows(keep_heads, adapter.head_dim).to(adapter.linear(layer_index, "q").weight.device)
    for role in ("q", "k", "v"):
        set_submodule(layer, getattr(layout, role), _sliced_linear(adapter.linear(layer_index, role), keep_rows=rows))
    set_submodule(layer, layout.o, _sliced_linear(adapter.linear(layer_index, "o"), keep_cols=rows))
    set_head_count(layer, layout, len(keep_heads), adapter.head_dim)


def slice_channels(adapter: EncoderAdapter, layer_index: int, keep_channels: list[int]) -> None:
    """Keep the FFN channels ``keep_channels`` of layer ``layer_index`` (at least one)."""
    layer, layout = adapter.layers[layer_index], adapter.layout
    size = adapter.widths(layer_index).intermediate
    _check_indices("keep_channels", keep_channels, size, layer_index)
    keep = torch.tensor(keep_channels, dtype=torch.long, device=adapter.linear(layer_index, "up").weight.device)
    set_submodule(layer, layout.up, _sliced_linear(adapter.linear(layer_index, "up"), keep_rows=keep))
    set_submodule(layer, layout.down, _sliced_linear(adapter.linear(layer_index, "down"), keep_cols=keep))


def add_o_bias(adapter: EncoderAdapter, layer_index: int, delta: list[float]) -> None:
    """Add ``delta`` [hidden] (float32 values) to the output projection's bias (compensation)."""
    o = adapter.linear(layer_index, "o")
    if o.bias is None or len(delta) != o.bias.shape[0]:
        raise PlanError(f"layer {layer_index}: o_proj_bias needs an output projection with a bias of {len(delta)} values")
    with torch.no_grad():
        o.bias.add_(torch.tensor(delta, dtype=torch.float32, device=o.bias.device).to(o.bias.dtype))


def apply_encoder_layer_plan(adapter: EncoderAdapter, plan: LayerPlan) -> None:
    """Slice one layer as ``plan`` says (None = unchanged): add the compensation bias first, then
    cut heads and channels."""
    if plan.keep_kv_heads is not None or plan.down_proj_bias is not None:
        raise PlanError(f"layer {plan.index}: encoder plans carry keep_heads, keep_channels and o_proj_bias only")
    if plan.o_proj_bias is not None:
        add_o_bias(adapter, plan.index, plan.o_proj_bias)
    if plan.keep_heads is not None:
        slice_heads(adapter, plan.index, list(plan.keep_heads))
    if plan.keep_channels is not None:
        slice_channels(adapter, plan.index, list(plan.keep_channels))


def apply_encoder_step(adapter: EncoderAdapter, step: PlanStep) -> None:
    """Apply every layer of ``step``, then write the per-layer widths into the model's config."""
    for plan in step.layers:
        if not 0 <= plan.index < adapter.num_layers:
            raise PlanError(f"plan layer {plan.index} does not exist (the model has {adapter.num_layers} layers)")
        apply_encoder_layer_plan(adapter, plan)
    record_widths(adapter)


def record_widths(adapter: EncoderAdapter) -> None:
    """Write per-layer head and FFN counts and the head size into ``adapter.config`` (the exporter
    turns these into the `pruned_*` config)."""
    widths = adapter.all_widths()
    adapter.config.num_attention_heads_per_layer = [w.heads for w in widths]
    adapter.config.intermediate_size_per_layer = [w.intermediate for w in widths]
    adapter.config.attention_head_dim = adapter.head_dim

