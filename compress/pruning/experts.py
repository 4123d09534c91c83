"""MoE expert pruning: statistics (scorer) ► keep counts (allocator) ► router rewrite (surgeon).

Notation, per sparse layer: t a calibration token, x_t [h] the MoE block input, g_{i,t} the final
routing weight of expert i when the router picked i for t (else 0), f_i(x_t) [h] expert i's raw
output, h_t [h] the residual stream entering the MoE add (after attention, not normalised),
R_t = sum_i g_{i,t} f_i(x_t) the routed output (shared expert excluded).

Criteria (all from ONE calibration forward, accumulated in float64):

    frequency       sum_t 1[i in topk(t)]                                   (token counts)
    soft_frequency  sum_t g_{i,t}
    reap            mean over t routed to i of g_{i,t}·‖f_i(x_t)‖₂          (REAP; 0 if never routed)
    easy_ep         sum_t g_{i,t}·‖f_i(x_t)‖₂·c_t,  c_t = max(1 − cos(h_t, h_t + R_t), 0)   (EASY-EP)

Router rewrite. The target semantics is "the original router with the pruned experts' scores at
-inf before top-k": the softmax runs over all E experts as before, the pruned ones just cannot be
picked, and the weights are what the original router makes of the picked scores. Slicing the kept
router rows (and bias) gives exactly that for

    softmax → top-k → renormalise   (Mixtral; Qwen2-MoE / Qwen3-MoE with norm_topk_prob: true)   EXACT

because softmax preserves the order of the kept scores and renormalised top-k weights do not depend
on the partition function. For

    softmax → top-k, no renormalise (Qwen1.5-MoE / Qwen2-MoE / Qwen3-MoE with norm_topk_prob: false)   NOT EXACT

the same experts are picked, but each kept weight grows by Z / Z_keep (Z the softmax partition
function over all experts, Z_keep over the kept ones; the sliced router equals masking the *logits*
at -inf before the softmax). The surgeon says so in its result (``exact: false``) and the statistics
give the mean kept softmax mass (Z_keep / Z averaged over calibration tokens) to size the effect.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from compress.errors import CompressError, PlanError

SCORES = ("easy_ep", "reap", "frequency", "soft_frequency")


# ============================================================================ statistics
@dataclass
class ExpertStats:
    """Calibration statistics of one sparse layer, each a float64 tensor [E].

    tokens: tokens seen.  counts: tokens routed to each expert.  gate_sum: sum_t g_{i,t}.
    prob_sum: sum_t softmax(logits_t)_i (the full router probability, routed or not).
    reap_sum: sum over routed t of g_{i,t}·‖f_i(x_t)‖.  easy_ep: sum_t g_{i,t}·‖f_i(x_t)‖·c_t.
    """

    layer: int
    num_experts: int
    top_k: int
    tokens: int = 0
    counts: torch.Tensor = None
    gate_sum: torch.Tensor = None
    prob_sum: torch.Tensor = None
    reap_sum: torch.Tensor = None
    easy_ep: torch.Tensor = None

    def __post_init__(self):
        for name in ("counts", "gate_sum", "prob_sum", "reap_sum", "easy_ep"):
            if getattr(self, name) is None:
                setattr(self, name, torch.zeros(self.num_experts, dtype=torch.float64))

    @property
    def frequency(self) -> torch.Tensor:
        return self.counts

    @property
    def soft_frequency(self) -> torch.Tensor:
        return self.gate_sum

    @property
    def reap(self) -> torch.Tensor:
        """[E] mean of g·‖f‖ over the tokens routed to each expert (0 for a never-routed expert)."""
        return torch.where(self.counts > 0, self.reap_sum / self.counts.clamp(min=1), torch.zeros_like(self.reap_sum))

    def score(self, name: str) -> torch.Tensor:
        if name not in SCORES:
            raise CompressError(f"score must be one of {', '.join(SCORES)} (got {name!r})")
        return getattr(self, name)

    def never_routed(self) -> list[int]:
        return [int(i) for i in torch.nonzero(self.counts == 0).flatten()]

    def kept_mass(self, keep: list[int]) -> float:
        """Mean over tokens of the router's softmax mass on ``keep`` (Z_keep / Z averaged): 1.0 when
        nothing is pruned; a non-renormalising router scales kept weights by about its inverse."""
        if self.tokens == 0:
            return float("nan")
        return float(self.prob_sum[keep].sum() / self.tokens)

    def to_dict(self) -> dict:
        return {
            "tokens": self.tokens,
            "frequency": self.counts.tolist(),
            "soft_frequency": self.gate_sum.tolist(),
            "router_prob": (self.prob_sum / max(self.tokens, 1)).tolist(),
            "reap": self.reap.tolist(),
            "easy_ep": self.easy_ep.tolist(),
        }


def accumulate_layer(stats: ExpertStats, moe_layer, residual: torch.Tensor, x: torch.Tensor,
                     logits: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> None:
    """Add one batch of tokens to ``stats``.

    residual: h_t [T, h].  x: MoE block input [T, h].  logits: router logits [T, E].
    weights / indices: final routing weights and expert ids [T, k].
    Expert outputs f_i are recomputed here (once per routed token) through the adapter's layout.
    """
    T, E = x.shape[0], stats.num_experts
    with torch.no_grad():
        gates = torch.zeros(T, E, dtype=torch.float64, device=x.device)
        gates.scatter_(1, indices, weights.to(torch.float64))
        routed = torch.zeros(T, E, dtype=torch.bool, device=x.device)
        routed.scatter_(1, indices, True)
        routed_sum = torch.zeros(T, x.shape[1], dtype=torch.float64, device=x.device)  # R_t
        contributions: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for i in torch.nonzero(routed.any(0)).flatten().tolist():
            tokens = torch.nonzero(routed[:, i]).flatten()
            out = moe_layer.experts.expert_output(i, x[tokens]).to(torch.float64)  # [T_i, h]
            gate = gates[tokens, i]
            contributions[i] = (tokens, gate * out.norm(dim=-1))
            routed_sum.index_put_((tokens,), gate[:, None] * out, accumulate=True)  # (index_add_ is slow on CPU)
        h = residual.to(torch.float64)
        c = (1.0 - torch.nn.functional.cosine_similarity(h, h + routed_sum, dim=-1, eps=1e-12)).clamp(min=0.0)
        for i, (tokens, contribution) in contributions.items():
            stats.reap_sum[i] += contribution.sum().cpu()
            stats.easy_ep[i] += (contribution * c[tokens]).sum().cpu()
        stats.counts += routed.sum(0).to(torch.float64).cpu()
        stats.gate_sum += gates.sum(0).cpu()
        stats.prob_sum += torch.softmax(logits.to(torch.float64), dim=-1).sum(0).cpu()
        stats.tokens += T


class ExpertStatsCollector:
    """Hooks on every sparse layer that fill one ExpertStats per layer during forwards.

    Per layer: a pre-hook on ``residual_input`` (post_attention_layernorm) keeps h_t; a hook on the
    router gets x_t (its input) and the routing (its output), then ``accumulate_layer`` runs.
    """

    def __init__(self, adapter):
        self.adapter = adapter
        self.stats = {layer.index: ExpertStats(layer.index, layer.num_experts, layer.top_k)
                      for layer in adapter.moe_layers()}

    @contextmanager
    def hooks(self):
        handles = []
        residuals: dict[int, torch.Tensor] = {}
        for layer in self.adapter.moe_layers():

            def keep_residual(_module, args, _i=layer.index):
                residuals[_i] = args[0]

            def observe(_module, args, output, _layer=layer):
                x = args[0].reshape(-1, args[0].shape[-1])
                logits, weights, indices = _layer.routing(output)
                residual = residuals.pop(_layer.index).reshape(-1, x.shape[-1])
                accumulate_layer(self.stats[_layer.index], _layer, residual, x, logits, weights, indices)

            handles.append(layer.residual_input.register_forward_pre_hook(keep_residual))
            handles.append(layer.router.register_forward_hook(observe))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()


def collect_expert_stats(adapter, input_ids: torch.Tensor, batch_size: int = 8, progress: bool = False) -> dict[int, ExpertStats]:
    """One calibration forward (block by block) over ``input_ids`` [n, seqlen]; returns the
    statistics of every sparse layer and warns about experts no calibration token was routed to."""
    from compress.calibration.runner import LayerRunner

    collector = ExpertStatsCollector(adapter)
    runner = LayerRunner(adapter, input_ids, batch_size=batch_size, progress=progress)
    runner.capture_inputs()
    with collector.hooks():
        for index in runner.blocks("expert statistics"):
            runner.run_block(index)
    never = {i: s.never_routed() for i, s in collector.stats.items() if s.never_routed()}
    if never:
        listed = "; ".join(f"layer {i}: {ids}" for i, ids in never.items())
        warnings.warn(f"experts never routed on the calibration data (they score 0): {listed}", UserWarning, stacklevel=2)
    return collector.stats


# ============================================================================ ranking and allocation
def rank_experts(scores: torch.Tensor, tie_break: torch.Tensor | None = None) -> list[int]:
    """Expert ids, best first: by score, then by ``tie_break`` (e.g. soft frequency), then lower id."""
    tie = tie_break if tie_break is not None else torch.zeros_like(scores)
    return sorted(range(scores.numel()), key=lambda i: (-float(scores[i]), -float(tie[i]), i))


def keep_count(keep: float, num_experts: int) -> int:
    """Experts one layer of ``num_experts`` keeps under ``keep``: a whole number >= 1 is a count,
    a value in (0, 1) a fraction (rounded to the nearest count)."""
    if keep >= 1:
        if keep != int(keep):
            raise CompressError(f"keep: a count must be a whole number (got {keep})")
        count = int(keep)
    elif keep > 0:
        count = int(math.floor(keep * num_experts + 0.5))
    else:
        raise CompressError(f"keep: must be a count >= 1 or a fraction in (0, 1) (got {keep})")
    if count > num_experts:
        raise CompressError(f"keep: {count} experts asked for, but a layer has only {num_experts}")
    return count


def check_floor(layer: int, count: int, top_k: int) -> None:
    """Fail closed: a layer must keep at least top_k experts, or routing cannot pick k of them."""
    if count < top_k:
        raise CompressError(
            f"keep: layer {layer} would keep {count} experts, fewer than top_k = {top_k} experts per token; "
            "keep more, or lower `top_k`"
        )


def allocate_uniform(rankings: dict[int, list[int]], keep: float, top_k: int) -> dict[int, list[int]]:
    """Every layer keeps its best ``keep_count(keep, E_l)`` experts (sorted ids)."""
    kept = {}
    for layer, ranked in rankings.items():
        count = keep_count(keep, len(ranked))
        check_floor(layer, count, top_k)
        kept[layer] = sorted(ranked[:count])
    return kept


def normalised_scores(scores: torch.Tensor) -> torch.Tensor:
    """[E] scores divided by their layer mean (sum E), so layers compare on one scale; all-zero stays 0."""
    mean = scores.to(torch.float64).mean()
    return scores.to(torch.float64) / mean if mean > 0 else torch.zeros_like(scores, dtype=torch.float64)


def allocate_global(scores: dict[int, torch.Tensor], rankings: dict[int, list[int]], keep: float,
                    top_k: int) -> dict[int, list[int]]:
    """One ranking over all layers of the mean-normalised scores; the budget is what ``uniform``
    would keep in total. Each layer first keeps its best ``min(top_k + 1, E_l)`` experts (the floor),
    then the remaining budget goes to the highest normalised scores anywhere (ties: lower layer,
    then the layer's own ranking)."""
    floors = {layer: min(top_k + 1, len(ranked)) for layer, ranked in rankings.items()}
    budget = sum(keep_count(keep, len(ranked)) for ranked in rankings.values())
    for layer, ranked in rankings.items():
        check_floor(layer, min(floors[layer], len(ranked)), top_k)
    if budget < sum(floors.values()):
        raise CompressError(
            f"keep: the global budget of {budget} experts is below the per-layer floors (top_k + 1 = {top_k + 1} "
            f"per layer, {sum(floors.values())} in all); keep more experts or use `allocator: uniform`"
        )
    kept = {layer: list(ranked[: floors[layer]]) for layer, ranked in rankings.items()}
    candidates = []
    for layer, ranked in rankings.items():
        normal = normalised_scores(scores[layer])
        for position, expert in enumerate(ranked[floors[layer]:], start=floors[layer]):
            candidates.append((-float(normal[expert]), layer, position, expert))
    candidates.sort()
    for _, layer, _, expert in candidates[: budget - sum(floors.values())]:
        kept[layer].append(expert)
    return {layer: sorted(ids) for layer, ids in kept.items()}


# ============================================================================ surgeon
@dataclass
class LayerSurgery:
    """What the surgeon did to one sparse layer (ids in the numbering it found)."""

    layer: int
    num_experts: int
    kept: list[int]
    top_k_before: int
    top_k_after: int
    router_rule: str
    exact: bool


@dataclass
class ExpertSurgeon:
    """Keeps the chosen experts of each sparse layer and rewrites the router to match.

    Per layer: router rows (+ bias, + score-correction bias) and every expert tensor are sliced on
    dim 0 to the kept ids (renumbered 0..K-1 in their original order), ``num_experts`` is updated on
    the router, experts and block modules, and top-k is lowered when asked; the config follows when
    all layers agree. Shared experts are never touched. Fails closed when a layer would keep fewer
    than top_k experts.

    top_k: new experts-per-token (None keeps each layer's own); it may only be lowered.
    """

    top_k: int | None = None
    results: list[LayerSurgery] = field(default_factory=list)

    def new_top_k(self, layer) -> int:
        if self.top_k is None:
            return layer.top_k
        if self.top_k > layer.top_k:
            raise CompressError(f"top_k: {self.top_k} is more than layer {layer.index}'s top_k {layer.top_k}; "
                                "it may only be lowered")
        return self.top_k

    def check(self, adapter, kept: dict[int, list[int]]) -> None:
        """Validate every layer's kept ids before anything is cut (all or nothing)."""
        layers = {layer.index: layer for layer in adapter.moe_layers()}
        for index, ids in kept.items():
            if index not in layers:
                raise PlanError(f"layer {index} is not a sparse MoE layer of this model")
            layer = layers[index]
            if sorted(set(ids)) != list(ids) or not ids or ids[0] < 0 or ids[-1] >= layer.num_experts:
                raise PlanError(f"layer {index}: kept experts must be sorted unique ids in [0, {layer.num_experts}), "
                                f"got {ids[:8]}")
            check_floor(index, len(ids), self.new_top_k(layer))

    def apply(self, adapter, kept: dict[int, list[int]]) -> list[LayerSurgery]:
        """Cut every sparse layer named in ``kept`` (layer -> sorted kept ids); returns what was done."""
        self.check(adapter, kept)
        self.results = []
        for layer in adapter.moe_layers():
            if layer.index not in kept:
                continue
            before, top_k = layer.top_k, self.new_top_k(layer)
            result = LayerSurgery(layer.index, layer.num_experts, list(kept[layer.index]), before, top_k,
                                  layer.rule.name, layer.rule.exact_after_slicing)
            layer.select_experts(torch.tensor(kept[layer.index], dtype=torch.long))
            layer.set_top_k(top_k)
            self.results.append(result)
        adapter.sync_config()
        return self.results
