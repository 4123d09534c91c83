"""Prunable units of a layer, built from channel scores under a GQA policy.

A unit is what an allocator keeps or drops as a whole:
  * MLP: one channel;
  * attention, ``gqa: kv_groups``: one KV head with all its query heads;
  * attention, ``gqa: query_heads``: a *slot* — the s-th weakest query head of every KV group.
    Dropping slots removes the same number of query heads from each group, so KV heads stay and
    stock ``repeat_kv`` still works.

Scores are aggregated from channels either as the mean of per-layer z-scores (FLAP's adaptive
structures) or as raw sums (uniform structures and the baselines).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from compress.pruning.scores import LayerScores


@dataclass
class UnitSet:
    """Units of one kind in one layer.

    scores: [n] float64, higher = more important. cost: parameters removed with one unit.
    ordered: units are sorted weakest → strongest and must be kept as a suffix (slots).
    members: for attention units, the query heads of each unit; kv_members: its KV head (kv_groups).
    """

    layer: int
    kind: str
    scores: torch.Tensor
    cost: int
    min_keep: int = 1
    ordered: bool = False
    members: list[list[int]] = field(default_factory=list)
    kv_members: list[int] | None = None

    @property
    def size(self) -> int:
        return int(self.scores.numel())

    def kept_units(self, count: int) -> list[int]:
        """Indices of the ``count`` units to keep: the strongest (ties: lower index first)."""
        count = max(0, min(count, self.size))
        if self.ordered:
            return list(range(self.size - count, self.size))
        order = sorted(range(self.size), key=lambda k: (-float(self.scores[k]), k))
        return sorted(order[:count])


@dataclass
class LayerUnits:
    """All units of one layer, plus the decoder-linear parameters no unit can remove."""

    attn: UnitSet
    mlp: UnitSet
    fixed_params: int

    @property
    def total_params(self) -> int:
        return self.attn.size * self.attn.cost + self.mlp.size * self.mlp.cost + self.fixed_params


def standardize(scores: torch.Tensor) -> torch.Tensor:
    """z-scores over one layer's channels (unbiased std); zeros when the std vanishes."""
    std = scores.std() if scores.numel() > 1 else torch.zeros((), dtype=scores.dtype)
    if not torch.isfinite(std) or std == 0:
        return torch.zeros_like(scores)
    return (scores - scores.mean()) / std


def layer_gqa(gqa: str, kv_heads: int, heads_per_kv: int, min_heads: int) -> str:
    """The GQA policy one layer uses: ``kv_groups`` falls back to ``query_heads`` where no KV group
    may go (``kv_heads <= min_heads``) and a group has query heads to lose (``heads_per_kv > 1``)."""
    if gqa == "kv_groups" and kv_heads <= max(min_heads, 1) and heads_per_kv > 1:
        return "query_heads"
    return gqa


def build_layer_units(
    adapter,
    layer_index: int,
    scores: LayerScores,
    *,
    gqa: str,
    aggregation: str,
    min_heads: int = 1,
    min_channels: int = 1,
) -> LayerUnits:
    """Group one layer's channel scores into units.

    Args:
        gqa: "kv_groups" or "query_heads".
        aggregation: "mean_z" (standardise per layer and module, mean over a unit's channels) or
            "sum" (raw scores summed over a unit's channels).
        min_heads: attention units every layer keeps (slots or KV groups).
        min_channels: MLP channels every layer keeps.
    """
    widths = adapter.widths(layer_index)
    d = adapter.head_dim
    attn_channels = scores.attn.to(torch.float64)
    mlp_channels = scores.mlp.to(torch.float64)
    if aggregation == "mean_z":
        attn_channels, mlp_channels = standardize(attn_channels), standardize(mlp_channels)
        head_scores = attn_channels.reshape(widths.heads, d).mean(dim=1)
        combine = lambda t: t.mean(dim=-1)  # noqa: E731
    elif aggregation == "sum":
        head_scores = attn_channels.reshape(widths.heads, d).sum(dim=1)
        combine = lambda t: t.sum(dim=-1)  # noqa: E731
    else:
        raise ValueError(f"unknown aggregation {aggregation!r}")

    g = widths.heads_per_kv
    gqa = layer_gqa(gqa, widths.kv_heads, g, min_heads)
    heads_by_group = torch.arange(widths.heads).reshape(widths.kv_heads, g)  # [kv, g]
    if gqa == "kv_groups":
        attn = UnitSet(
            layer=layer_index,
            kind="attn",
            scores=combine(head_scores[heads_by_group]),
            cost=adapter.kv_group_cost(layer_index),
            min_keep=min_heads,
            members=[row.tolist() for row in heads_by_group],
            kv_members=list(range(widths.kv_heads)),
        )
        fixed = 0
    elif gqa == "query_heads":
        group_scores = head_scores[heads_by_group]  # [kv, g]
        # Stable sort so equal scores keep their head order; slot s = s-th weakest of each group.
        order = torch.sort(group_scores, dim=1, stable=True).indices
        slot_heads = torch.gather(heads_by_group, 1, order).T  # [g, kv]
        slot_scores = torch.gather(group_scores, 1, order).T  # [g, kv]
        attn = UnitSet(
            layer=layer_index,
            kind="attn",
            scores=combine(slot_scores),
            cost=widths.kv_heads * adapter.query_head_cost(layer_index),
            min_keep=min_heads,
            ordered=True,
            members=[sorted(row.tolist()) for row in slot_heads],
        )
        fixed = widths.kv_heads * adapter.kv_head_cost(layer_index)
    else:
        raise ValueError(f"unknown GQA policy {gqa!r}")

    mlp = UnitSet(
        layer=layer_index,
        kind="mlp",
        scores=mlp_channels,
        cost=adapter.channel_cost(layer_index),
        min_keep=min_channels,
    )
    return LayerUnits(attn=attn, mlp=mlp, fixed_params=fixed)


def kept_heads(units: UnitSet, kept: list[int]) -> tuple[list[int], list[int] | None]:
    """(query heads, KV heads or None when KV heads are untouched) kept by these attention units."""
    heads = sorted(h for k in kept for h in units.members[k])
    kv = sorted(units.kv_members[k] for k in kept) if units.kv_members is not None else None
    return heads, kv
