"""Allocators: turn unit scores into per-layer keep counts under a parameter budget.

The budget is FLAP's ratio p: the fraction of decoder attention+MLP linear weights removed. Every
allocator returns, per layer, ``(attention units kept, MLP channels kept)``.
"""

from __future__ import annotations

import math

import torch

from compress.pruning.units import LayerUnits


def _clip(count: int, units) -> int:
    return max(min(units.min_keep, units.size), min(units.size, count))


def allocate_uniform(layers: list[LayerUnits], ratio: float) -> list[tuple[int, int]]:
    """Every layer loses the same share: ``int(p·n)`` attention units, then MLP channels up to
    that layer's parameter budget (attention units are coarse under GQA, channels fill the rest)."""
    counts = []
    for lu in layers:
        attn_removed = lu.attn.size - _clip(lu.attn.size - int(ratio * lu.attn.size), lu.attn)
        remove_params = ratio * lu.total_params - attn_removed * lu.attn.cost
        channels_removed = max(0, round(remove_params / lu.mlp.cost))
        counts.append((lu.attn.size - attn_removed, _clip(lu.mlp.size - channels_removed, lu.mlp)))
    return counts


def _keep_target(layers: list[LayerUnits], ratio: float) -> float:
    """Parameters the prunable units may keep: (1 - p)·total minus what no unit can remove."""
    total = sum(lu.total_params for lu in layers)
    fixed = sum(lu.fixed_params for lu in layers)
    return (1.0 - ratio) * total - fixed


def allocate_global(layers: list[LayerUnits], ratio: float) -> list[tuple[int, int]]:
    """FLAP's adaptive structure (AL-AM) with an exact budget.

    Per-layer minimums are kept first. The other units, pooled over layers and both kinds, are
    taken strongest first (ties: layer, kind, index) until the budget is reached; the unit that
    crosses the budget is taken only if that lands closer to it.
    """
    budget = _keep_target(layers, ratio)
    attn_keep = [0] * len(layers)
    mlp_keep = [0] * len(layers)
    candidates: list[tuple[float, int, int, int, int]] = []  # (-score, layer, kind, index, cost)
    for li, lu in enumerate(layers):
        for kind, units in ((0, lu.attn), (1, lu.mlp)):
            forced = set(units.kept_units(min(units.min_keep, units.size)))
            budget -= len(forced) * units.cost
            if kind == 0:
                attn_keep[li] = len(forced)
            else:
                mlp_keep[li] = len(forced)
            for k in range(units.size):
                if k not in forced:
                    candidates.append((-float(units.scores[k]), li, kind, k, units.cost))
    candidates.sort()
    spent = 0.0
    for _neg, li, kind, _k, cost in candidates:
        if spent + cost > budget and (spent + cost - budget) >= (budget - spent):
            break
        spent += cost
        if kind == 0:
            attn_keep[li] += 1
        else:
            mlp_keep[li] += 1
        if spent >= budget:
            break
    return list(zip(attn_keep, mlp_keep))


def allocate_global_reference(layers: list[LayerUnits], ratio: float) -> list[tuple[int, int]]:
    """The FLAP reference rule (``parity: true``): pooled scores sorted descending, threshold at
    ``argmin |cumsum(cost) - target|``, keep units with score strictly above it. No floors
    unless the units carry a ``min_keep``."""
    scores, costs, owners = [], [], []
    for li, lu in enumerate(layers):
        for kind, units in ((0, lu.attn), (1, lu.mlp)):
            scores.append(units.scores)
            costs.append(torch.full((units.size,), float(units.cost), dtype=torch.float64))
            owners.extend((li, kind) for _ in range(units.size))
    pooled = torch.cat(scores)
    weights = torch.cat(costs)
    sorted_scores, order = torch.sort(pooled, descending=True)
    cumulative = torch.cumsum(weights[order], dim=0)
    threshold = sorted_scores[torch.argmin((cumulative - _keep_target(layers, ratio)).abs())]
    keep = pooled > threshold
    attn_keep = [0] * len(layers)
    mlp_keep = [0] * len(layers)
    for kept, (li, kind) in zip(keep.tolist(), owners):
        if kept:
            if kind == 0:
                attn_keep[li] += 1
            else:
                mlp_keep[li] += 1
    return [(_clip(a, lu.attn), _clip(m, lu.mlp)) for a, m, lu in zip(attn_keep, mlp_keep, layers)]


def round_channels(count: int, multiple: int, size: int) -> int:
    """Round a kept-channel count to the nearest multiple (at least one multiple, at most ``size``)."""
    if multiple <= 1:
        return count
    return min(size, max(multiple, int(math.floor(count / multiple + 0.5)) * multiple))


ALLOCATORS = {
    "uniform": allocate_uniform,
    "global": allocate_global,
}
