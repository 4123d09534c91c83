"""moe_experts: prune whole routed experts of an MoE model (EASY-EP, REAP, frequency).

The pass's name, options and docs are declared in :mod:`passes.moe_experts`; this is what runs it.
"""

from __future__ import annotations

from compress.errors import PlanError
from compress.plan import PlanStep
from passes.moe_experts import MoeExperts


class MoeExpertsPass(MoeExperts):
    """Runs the ``moe_experts`` pass (declared by :class:`passes.moe_experts.MoeExperts`)."""

    def __init__(self, options: "MoeExpertsPass.Options"):
        self.options = options

    # ------------------------------------------------------------------------------- parts
    def calibration_windows(self, ctx):
        """[n, seqlen] windows: the recipe's calibration windows, or `source` when given."""
        o = self.options
        if o.source is None:
            return ctx.calibration_ids(), "recipe calibration"
        from compress.calibration.sources import random_windows
        from passes._common import training_ids

        ids = training_ids(ctx, o.source, self.name)
        return random_windows(ids, o.samples, o.seqlen, o.seed, source=o.source, field=f"passes.{self.name}"), o.source

    def allocate(self, stats: dict, top_k: int) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
        """(ranked ids best first, kept sorted ids) per sparse layer."""
        from compress.pruning.experts import allocate_global, allocate_uniform, rank_experts

        o = self.options
        scores = {i: s.score(o.score) for i, s in stats.items()}
        rankings = {i: rank_experts(scores[i], stats[i].soft_frequency) for i in stats}
        if o.allocator == "uniform":
            return rankings, allocate_uniform(rankings, o.keep, top_k)
        return rankings, allocate_global(scores, rankings, o.keep, top_k)

    # -------------------------------------------------------------------------------- run
    def run(self, ctx) -> PlanStep:
        from compress.pruning.experts import ExpertSurgeon, collect_expert_stats

        o = self.options
        adapter = ctx.adapter()
        if not hasattr(adapter, "moe_layers"):
            from compress.errors import CompressError

            raise CompressError(f"moe_experts needs a mixture-of-experts model, got {type(ctx.model).__name__}")
        windows, described = self.calibration_windows(ctx)
        stats = collect_expert_stats(adapter, windows, batch_size=ctx.batch_size, progress=ctx.progress)
        surgeon = ExpertSurgeon(top_k=o.top_k)
        top_k = min(surgeon.new_top_k(layer) for layer in adapter.moe_layers())
        rankings, kept = self.allocate(stats, top_k)
        original = {layer.index: original_ids(layer) for layer in adapter.moe_layers()}
        results = surgeon.apply(adapter, kept)

        layers = []
        for result in results:
            s, ids = stats[result.layer], original[result.layer]
            layers.append({
                "layer": result.layer,
                "num_experts": result.num_experts,
                "kept": result.kept,
                "kept_original": [ids[i] for i in result.kept],
                "ranked": rankings[result.layer],
                "scores": s.score(o.score).tolist(),
                "tokens": [int(c) for c in s.counts.tolist()],
                "statistics": s.to_dict(),
                "top_k": result.top_k_after,
                "router_exact": result.exact,
                "kept_router_mass": s.kept_mass(result.kept),
            })
            remember_original_ids(adapter.moe_layer(result.layer), [ids[i] for i in result.kept])
        inexact = [r.layer for r in results if not r.exact]
        details = {
            "score": o.score,
            "allocator": o.allocator,
            "calibration": {"source": described, "windows": int(windows.shape[0]), "seqlen": int(windows.shape[1]),
                            "tokens_per_layer": next(iter(stats.values())).tokens},
            "router_rule": sorted({r.router_rule for r in results}),
            "router_exact": not inexact,
            "router_note": (
                "exact: kept experts are routed as the original router with the pruned experts' scores at -inf "
                "before top-k"
                if not inexact else
                f"NOT exact in layers {inexact}: the router does not renormalise its top-k weights, so each kept "
                "weight grows by Z / Z_keep (about 1 / kept_router_mass)"
            ),
            "experts_before": sum(r.num_experts for r in results),
            "experts_after": sum(len(r.kept) for r in results),
            "never_routed": {str(i): s.never_routed() for i, s in stats.items() if s.never_routed()},
            "moe_layers": layers,
        }
        if inexact:
            import warnings

            warnings.warn(f"moe_experts: {details['router_note']}", UserWarning, stacklevel=2)
        return PlanStep(self.name, o.model_dump(), layers=[], details=details)

    @staticmethod
    def replay(model, step: PlanStep) -> None:
        """``compress apply``: keep the recorded experts (ids as the step saw the model) and top-k."""
        from compress.models.adapters import get_adapter
        from compress.pruning.experts import ExpertSurgeon

        adapter = get_adapter(model)
        if not hasattr(adapter, "moe_layers"):
            raise PlanError(f"the moe_experts step needs a mixture-of-experts model, got {type(model).__name__}")
        try:
            records = step.details["moe_layers"]
            kept = {int(r["layer"]): [int(i) for i in r["kept"]] for r in records}
            counts = {int(r["layer"]): int(r["num_experts"]) for r in records}
            top_ks = {int(r["top_k"]) for r in records}
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(f"malformed moe_experts step: details.moe_layers ({exc})") from None
        actual = adapter.expert_counts()
        for layer, count in counts.items():
            if actual.get(layer) != count:
                raise PlanError(f"the moe_experts step was made for {count} experts in layer {layer}, "
                                f"this model has {actual.get(layer)}")
        top_k = top_ks.pop() if len(top_ks) == 1 else None
        ExpertSurgeon(top_k=top_k).apply(adapter, kept)
        for record in records:
            remember_original_ids(adapter.moe_layer(int(record["layer"])), [int(i) for i in record["kept_original"]])


ORIGINAL_IDS_ATTRIBUTE = "compress_original_expert_ids"


def original_ids(layer) -> list[int]:
    """The original expert id of each expert the layer holds now (identity for an unpruned layer)."""
    ids = getattr(layer.block, ORIGINAL_IDS_ATTRIBUTE, None)
    return list(ids) if ids is not None and len(ids) == layer.num_experts else list(range(layer.num_experts))


def remember_original_ids(layer, ids: list[int]) -> None:
    """Record on the block which original experts it holds, so a later step can report them."""
    setattr(layer.block, ORIGINAL_IDS_ATTRIBUTE, list(ids))
