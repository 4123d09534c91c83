"""CFSP: coarse-to-fine structured pruning (Wang et al., COLING 2025).

Coarse: each block's keep ratio comes from how far it turns the hidden state on calibration text
(the ``block_budget`` allocator). Fine: inside each block, the channels with the highest CFSP score
survive. By default only MLP channels are pruned, as in the paper; ``attention: true`` lets the
block budget take heads (or KV groups) too.

The pass's name, options and docs are declared in :mod:`passes.cfsp`; this is what runs it.
"""

from __future__ import annotations

from compress.plan import PlanStep
from compress.pruning.scores import CfspScorer
from compress.pruning.structured import PrunerSettings, StructuredPruner
from passes._common import pruner_settings
from passes.cfsp import Cfsp


class CfspPass(Cfsp):
    """Runs the ``cfsp`` pass (declared by :class:`passes.cfsp.Cfsp`)."""

    def __init__(self, options: "CfspPass.Options"):
        self.options = options

    def settings(self) -> PrunerSettings:
        o = self.options
        aggregation = "mean_z" if o.allocator in ("global", "search") else "sum"
        return pruner_settings(o, aggregation=aggregation, allocator=o.allocator, sequential=o.sequential,
                               prune_attention=o.attention)

    def run(self, ctx) -> PlanStep:
        scorer = CfspScorer(self.options.score, b=self.options.b, c=self.options.c)
        step = StructuredPruner(scorer, self.settings()).run(ctx)
        step.pass_name, step.options = self.name, self.options.model_dump()
        return step
