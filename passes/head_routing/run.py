"""head_routing: the deployment half of SHRP-style head routing, for stock encoders.

SHRP (Su et al., 2025) trains a top-1 router over attention heads and, at deployment, drops the
heads the router rarely chooses. The training-time router (and SHRP's shared expander FFN) is out
of scope: it changes the architecture and needs training. What a stock checkpoint supports is the
deterministic deployment rule, with a router-free stand-in for the routing statistic: on each
calibration example, the head that "carries" it in a layer is the one with the largest
contribution to the residual stream, ‖W_O,h E_h‖ summed over the example's tokens. Each layer keeps
the heads that win the most examples (ties: larger total contribution, then lower index).

The pass's name, options and docs are declared in :mod:`passes.head_routing`; this is what runs it.
"""

from __future__ import annotations

import torch

from compress.errors import CompressError
from compress.plan import LayerPlan, PlanStep
from passes.head_routing import HeadRouting


def kept_by_usage(wins: torch.Tensor, tie_break: torch.Tensor, keep: int) -> list[int]:
    """The ``keep`` heads with most wins [heads] (ties: larger ``tie_break``, then lower index), sorted."""
    order = sorted(range(len(wins)), key=lambda h: (-int(wins[h]), -float(tie_break[h]), h))
    return sorted(order[:keep])


class HeadRoutingPass(HeadRouting):
    """Runs the ``head_routing`` pass (declared by :class:`passes.head_routing.HeadRouting`)."""

    def __init__(self, options: "HeadRoutingPass.Options"):
        self.options = options

    def keep_count(self, heads: int) -> int:
        keep = self.options.keep
        return min(heads, keep if isinstance(keep, int) else max(1, round(keep * heads)))

    def run(self, ctx) -> PlanStep:
        from compress.models.encoder import EncoderAdapter
        from compress.pruning.encoder_surgeon import apply_encoder_step
        from compress.pruning.head_scores import count_wins, head_contribution_stats

        adapter = ctx.adapter()
        if not isinstance(adapter, EncoderAdapter):
            raise CompressError(f"head_routing works on encoders (BERT, ViT, DeiT, DINOv2, CLIP towers); got {type(ctx.model).__name__}")
        batches = ctx.calibration_batches()
        stats = head_contribution_stats(adapter, batches)  # one pass: per-example top heads and contributions
        contribution = stats["output_norm"]
        wins = count_wins(stats["example_top1"], [len(c) for c in contribution])
        layers, kept_all = [], []
        for i, (w, c) in enumerate(zip(wins, contribution)):
            heads = len(w)
            kept = kept_by_usage(w, c, self.keep_count(heads)) if heads else []
            kept_all.append(kept)
            if heads and len(kept) < heads:
                layers.append(LayerPlan(index=i, keep_heads=kept))
        step = PlanStep(pass_name=self.name, options=self.options.model_dump(), layers=layers)
        step.details = {"examples": sum(len(next(iter(b.values()))) for b in batches),
                        "heads_total": sum(len(w) for w in wins),
                        "heads_removed": sum(len(w) - len(k) for w, k in zip(wins, kept_all)),
                        "wins": [[int(x) for x in w] for w in wins], "kept_heads": kept_all}
        apply_encoder_step(adapter, step)
        return step
