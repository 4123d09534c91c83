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


def uniform_share(totals: list[int], skipped: set[int], ratio: float) -> float:
    """The share each pruned layer loses so that the layers of ``totals`` (decoder-linear parameters
    per layer) lose ``ratio`` of the total, when the ``skipped`` layers lose nothing."""
    pruned = sum(t for i, t in enumerate(totals) if i not in skipped)
    if pruned <= 0:
        raise ValueError("every layer is skipped: nothing can be pruned")
    share = ratio * sum(totals) / pruned
    if share >= 1.0:
        raise ValueError(f"ratio {ratio} leaves nothing in the layers that are not skipped (each would lose "
                         f"{share:.0%}); lower the ratio or skip fewer layers")
    return share


def _keep_target(layers: list[LayerUnits], ratio: float) -> float:
    """Parameters the prunable units may keep: (1 - p)·total minus what no unit can remove."""
    total = sum(lu.total_params for lu in layers)
    fixed = sum(lu.fixed_params for lu in layers)
    return (1.0 - ratio) * total - fixed


def allocate_global(layers: list[LayerUnits], ratio: float) -> list[tuple[int, int]]:
    """FLAP's adaptive structure (AL-AM) with an exact budget: :func:`allocate_pooled` over every
    layer's attention and MLP units (ties: layer, kind, index)."""
    counts = allocate_pooled([u for lu in layers for u in (lu.attn, lu.mlp)], _keep_target(layers, ratio))
    return list(zip(counts[0::2], counts[1::2]))


def allocate_pooled(unit_sets: list, keep_budget: float) -> list[int]:
    """Keep counts per unit set under one parameter budget.

    Each set's minimum (``min_keep`` strongest units) is kept first. The other units, pooled over
    all sets, are taken strongest first (ties: set, index) until ``keep_budget`` parameters are
    kept; the unit that crosses the budget is taken only if that lands closer to it. Scores must be
    comparable across sets (e.g. standardised per set).
    """
    budget = keep_budget
    keep = [0] * len(unit_sets)
    candidates: list[tuple[float, int, int, int]] = []  # (-score, set, index, cost)
    for si, units in enumerate(unit_sets):
        forced = set(units.kept_units(min(units.min_keep, units.size)))
        budget -= len(forced) * units.cost
        keep[si] = len(forced)
        for k in range(units.size):
            if k not in forced:
                candidates.append((-float(units.scores[k]), si, k, units.cost))
    candidates.sort()
    spent = 0.0
    for _neg, si, _k, cost in candidates:
        if spent + cost > budget and (spent + cost - budget) >= (budget - spent):
            break
        spent += cost
        keep[si] += 1
        if spent >= budget:
            break
    return keep


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


def block_keep_ratios(importance: list[float], weights: list[float], mean_keep: float, temperature: float,
                      headroom: float = 1.05) -> list[float]:
    """CFSP's coarse allocation: per-block keep ratios from block importance.

    ``s_i = sigmoid((B_i - mean B) / temperature)`` and ``r_i = s_i / mean_w(s) · mean_keep``, where
    ``mean_w`` is the mean weighted by each block's prunable parameters, so the weighted mean of the
    ratios is exactly ``mean_keep``. When the largest ratio would exceed 1, every deviation from the
    mean is shrunk by the same factor so the largest is ``1 / headroom`` of the way to 1 (the
    reference's rule, with its 1.05). Returns one ratio per block in (0, 1].
    """
    if not 0.0 < mean_keep <= 1.0:
        raise ValueError(f"mean keep ratio must be in (0, 1], got {mean_keep}")
    b = torch.tensor(importance, dtype=torch.float64)
    w = torch.tensor(weights, dtype=torch.float64)
    if mean_keep == 1.0 or b.numel() == 0:
        return [1.0] * b.numel()
    s = torch.sigmoid((b - b.mean()) / temperature)
    mean_s = (s * w).sum() / w.sum()
    ratios = s / mean_s * mean_keep
    if ratios.max() >= 1.0:
        # Shrink deviations around the weighted mean (= mean_keep) so the largest lands below 1.
        factor = (1.0 - mean_keep) / (ratios.max() - mean_keep) / headroom
        ratios = mean_keep + (ratios - mean_keep) * factor
    return ratios.tolist()


def allocate_block_budget(layers: list[LayerUnits], ratio: float, importance: list[float],
                          temperature: float = 0.075, multiple: int = 1) -> list[tuple[int, int]]:
    """CFSP's block budget: each block keeps a share of its prunable parameters set by its importance.

    Prunable parameters of a block are its units that may go (a unit kind whose ``min_keep`` equals
    its size, e.g. attention in MLP-only mode or a skipped layer, is not prunable). Blocks with
    nothing prunable keep everything; the others share the budget through
    :func:`block_keep_ratios`. Inside a block, attention units are cut by the block's ratio first
    (they are coarse), and MLP channels fill the rest of its parameter budget; the channel counts
    are then nudged (largest remainder) so the total kept parameters match the budget; with
    ``multiple`` > 1 they are multiples of it, so rounding for GPU kernels keeps the budget.
    """
    if len(importance) != len(layers):
        raise ValueError(f"{len(importance)} block importances for {len(layers)} layers")
    prunable = []
    for lu in layers:
        attn = lu.attn.size * lu.attn.cost if lu.attn.min_keep < lu.attn.size else 0
        mlp = lu.mlp.size * lu.mlp.cost if lu.mlp.min_keep < lu.mlp.size else 0
        prunable.append(attn + mlp)
    fixed_kept = sum(lu.total_params for lu in layers) - sum(prunable)
    budget = (1.0 - ratio) * sum(lu.total_params for lu in layers) - fixed_kept
    active = [i for i, p in enumerate(prunable) if p > 0]
    if not active:
        return [(lu.attn.size, lu.mlp.size) for lu in layers]
    mean_keep = budget / sum(prunable[i] for i in active)
    if mean_keep <= 0:
        raise ValueError(f"ratio {ratio} removes more than every prunable unit; lower the ratio or prune attention too")
    mean_keep = min(mean_keep, 1.0)
    ratios = dict(zip(active, block_keep_ratios([importance[i] for i in active], [prunable[i] for i in active],
                                                mean_keep, temperature)))
    counts: list[list[float]] = []
    for i, lu in enumerate(layers):
        if i not in ratios:
            counts.append([lu.attn.size, lu.mlp.size])
            continue
        r = ratios[i]
        attn_prunable = lu.attn.min_keep < lu.attn.size
        attn_keep = _clip(round(r * lu.attn.size), lu.attn) if attn_prunable else lu.attn.size
        if lu.mlp.min_keep < lu.mlp.size:
            keep_params = r * prunable[i] - (attn_keep * lu.attn.cost if attn_prunable else 0)
            mlp_keep = min(max(keep_params / lu.mlp.cost, lu.mlp.min_keep), lu.mlp.size)
        else:
            mlp_keep = lu.mlp.size
        counts.append([attn_keep, mlp_keep])
    return _settle_channels(layers, counts, budget + fixed_kept, multiple)


def _settle_channels(layers: list[LayerUnits], counts: list[list[float]], keep_params: float,
                     multiple: int = 1) -> list[tuple[int, int]]:
    """Integer MLP counts (multiples of ``multiple`` where the layer is pruned) from fractional ones,
    whose kept parameters come closest to ``keep_params``: round down first, then add one multiple
    to the largest remainders while that gets closer to the budget."""
    step = max(1, multiple)
    floors = []
    for (_a, m), lu in zip(counts, layers):
        pruned = m < lu.mlp.size
        floors.append(max(step, int(math.floor(m / step)) * step) if pruned and step > 1 else int(math.floor(m)))
    kept = sum(a * lu.attn.cost + f * lu.mlp.cost + lu.fixed_params for (a, _m), f, lu in zip(counts, floors, layers))
    order = sorted(range(len(layers)), key=lambda i: (-(counts[i][1] - floors[i]), i))
    for i in order:
        lu = layers[i]
        grow = min(step, lu.mlp.size - floors[i])
        if grow <= 0 or abs(kept + grow * lu.mlp.cost - keep_params) >= abs(kept - keep_params):
            continue
        floors[i] += grow
        kept += grow * lu.mlp.cost
    return [(int(a), min(max(f, min(lu.mlp.min_keep, lu.mlp.size)), lu.mlp.size)) for (a, _m), f, lu in zip(counts, floors, layers)]


def round_channels(count: int, multiple: int, size: int) -> int:
    """Round a kept-channel count to the nearest multiple (at least one multiple, at most ``size``)."""
    if multiple <= 1:
        return count
    return min(size, max(multiple, int(math.floor(count / multiple + 0.5)) * multiple))


ALLOCATORS = {
    "uniform": allocate_uniform,
    "global": allocate_global,
}
