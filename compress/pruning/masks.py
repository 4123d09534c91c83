"""Keep masks of a decoder's prunable units, applied while training, turned into a plan at the end.

A masked query head is zeroed at the input of o_proj (its ``head_dim`` columns) and a masked MLP
channel at the input of down_proj. That is exactly what slicing the unit away does (attention is
computed per head, and a KV head whose query heads are all masked feeds nothing), so the sliced
model computes what the masked model computes, and the gradients of the masked units' q/k/v and
gate/up rows are zero while they stay masked.

:func:`select_units` turns unit scores into new masks through the shared unit builder and
allocators, with the units masked so far ranked below every other unit, so masks change as little
as possible from one update to the next.
"""

from __future__ import annotations

import torch

from compress.errors import CompressError
from compress.plan import LayerPlan
from compress.pruning.allocators import allocate_global, allocate_uniform
from compress.pruning.scores import LayerScores
from compress.pruning.units import LayerUnits, build_layer_units, standardize


class UnitMasks:
    """``keep_heads[i]`` [heads] and ``keep_channels[i]`` [intermediate] booleans per layer."""

    def __init__(self, adapter):
        widths = adapter.all_widths()
        self.head_dim = adapter.head_dim
        self.keep_heads = [torch.ones(w.heads, dtype=torch.bool) for w in widths]
        self.keep_channels = [torch.ones(w.intermediate, dtype=torch.bool) for w in widths]
        self.handles: list = []

    # ------------------------------------------------------------------------ hooks
    def attach(self, adapter) -> None:
        """Mask o_proj / down_proj inputs from now on (reads the current masks at every call)."""
        for i in range(adapter.num_layers):
            self.handles.append(adapter.attention_consumer(i).register_forward_pre_hook(self._hook(i, "attn")))
            self.handles.append(adapter.mlp_consumer(i).register_forward_pre_hook(self._hook(i, "mlp")))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _hook(self, layer: int, kind: str):
        def hook(module, args):
            if kind == "attn":
                keep = self.keep_heads[layer].repeat_interleave(self.head_dim)
            else:
                keep = self.keep_channels[layer]
            if bool(keep.all()):
                return None
            x = args[0]
            return (x * keep.to(device=x.device, dtype=x.dtype),) + tuple(args[1:])
        return hook

    # ------------------------------------------------------------------------ reading
    def removed_params(self, adapter, gqa: str) -> int:
        """Decoder-linear parameters the masked units hold."""
        removed = 0
        for i, (heads, channels) in enumerate(zip(self.keep_heads, self.keep_channels)):
            removed += int((~heads).sum()) * adapter.query_head_cost(i)
            removed += int((~channels).sum()) * adapter.channel_cost(i)
            if gqa == "kv_groups":
                removed += len(self.dropped_kv_heads(adapter, i)) * adapter.kv_head_cost(i)
        return removed

    def dropped_kv_heads(self, adapter, layer: int) -> list[int]:
        """KV heads none of whose query heads is kept."""
        kv_of_head = adapter.kv_head_of_query_heads(layer)
        kept_kv = set(kv_of_head[self.keep_heads[layer]].tolist())
        return [kv for kv in range(adapter.widths(layer).kv_heads) if kv not in kept_kv]

    def layer_plans(self, adapter, gqa: str) -> list[LayerPlan]:
        """What each layer keeps, in the surgeon's terms (``None`` where nothing is removed)."""
        plans = []
        for i, (heads, channels) in enumerate(zip(self.keep_heads, self.keep_channels)):
            widths = adapter.widths(i)
            keep_heads = torch.nonzero(heads).flatten().tolist()
            dropped_kv = self.dropped_kv_heads(adapter, i) if gqa == "kv_groups" else []
            keep_kv = [kv for kv in range(widths.kv_heads) if kv not in dropped_kv]
            keep_channels = torch.nonzero(channels).flatten().tolist()
            plans.append(LayerPlan(
                index=i,
                keep_heads=keep_heads if len(keep_heads) < widths.heads else None,
                keep_kv_heads=keep_kv if dropped_kv else None,
                keep_channels=keep_channels if len(keep_channels) < widths.intermediate else None,
            ))
        return plans

    def state_dict(self) -> dict:
        return {"keep_heads": [t.clone() for t in self.keep_heads], "keep_channels": [t.clone() for t in self.keep_channels]}

    def load_state_dict(self, state: dict) -> None:
        # in place, so hooks already registered see the restored masks
        for mine, saved in zip(self.keep_heads + self.keep_channels, state["keep_heads"] + state["keep_channels"]):
            mine.copy_(saved)


# ------------------------------------------------------------------------------------ selection
def _rank_masked_last(units, masked: torch.Tensor, standardise: bool) -> None:
    """Unit scores for the allocator: masked units at -inf; with ``standardise``, z-scores over the
    unmasked units (so layers and unit kinds compare in a global allocation)."""
    scores = units.scores.clone()
    free = ~masked
    if standardise and free.any():
        scores[free] = standardize(scores[free])
    scores[masked] = float("-inf")
    units.scores = scores


def select_units(adapter, head_scores: list[torch.Tensor], channel_scores: list[torch.Tensor], masks: UnitMasks,
                 ratio: float, *, gqa: str, allocator: str, skip_layers: set[int], min_heads: int = 1,
                 min_channels: int = 1) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """New keep masks that remove ``ratio`` of the decoder-linear parameters.

    Args:
        head_scores / channel_scores: per layer, [heads] and [intermediate] importance (higher = keep).
        allocator: "uniform" (every pruned layer loses the same share, scaled up so that the skipped
            layers' share is made up by the others) or "global" (one threshold over per-layer z-scores).
        skip_layers: layer indices never pruned.
    """
    d = adapter.head_dim
    all_units: list[LayerUnits] = []
    for i in range(adapter.num_layers):
        heads = head_scores[i].clone()
        heads[~masks.keep_heads[i]] = -1e30  # masked heads sort first inside their KV group
        channels = channel_scores[i]
        scores = LayerScores(attn=(heads / d).repeat_interleave(d), mlp=channels.clone())
        units = build_layer_units(adapter, i, scores, gqa=gqa, aggregation="sum", min_heads=min_heads,
                                  min_channels=min_channels)
        masked_attn = torch.tensor([not bool(masks.keep_heads[i][m].any()) for m in units.attn.members])
        _rank_masked_last(units.attn, masked_attn, standardise=allocator == "global")
        _rank_masked_last(units.mlp, ~masks.keep_channels[i], standardise=allocator == "global")
        if i in skip_layers:
            units.attn.min_keep, units.mlp.min_keep = units.attn.size, units.mlp.size
        all_units.append(units)

    if allocator == "global":
        counts = allocate_global(all_units, ratio)
    elif allocator == "uniform":
        total = sum(u.total_params for u in all_units)
        prunable = sum(u.total_params for i, u in enumerate(all_units) if i not in skip_layers)
        layer_ratio = ratio * total / prunable if prunable else 1.0
        if layer_ratio >= 1.0:
            raise CompressError(f"ratio: removing {ratio:.0%} of the decoder with layers {sorted(skip_layers)} "
                                "skipped would empty the other layers")
        counts = allocate_uniform(all_units, layer_ratio)
    else:
        raise ValueError(f"unknown allocator {allocator!r}")

    keep_heads, keep_channels = [], []
    for i, (units, (attn_keep, mlp_keep)) in enumerate(zip(all_units, counts)):
        kept = torch.zeros(masks.keep_heads[i].numel(), dtype=torch.bool)
        for k in units.attn.kept_units(attn_keep):
            kept[units.attn.members[k]] = True
        keep_heads.append(kept)
        channels = torch.zeros(units.mlp.size, dtype=torch.bool)
        channels[units.mlp.kept_units(mlp_keep)] = True
        keep_channels.append(channels)
    return keep_heads, keep_channels
