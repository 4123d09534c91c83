"""FLAP: fluctuation-based adaptive structured pruning (An et al., AAAI 2024).

The pass's name, options and docs are declared in :mod:`passes.flap`; this is what runs it.
"""

from __future__ import annotations

from dataclasses import replace

from compress.plan import PlanStep
from compress.pruning.scores import FluctuationScorer, ObsScorer
from compress.pruning.structured import PrunerSettings, StructuredPruner
from passes._common import pruner_settings
from passes.flap import Flap


class FlapPass(Flap):
    """Runs the ``flap`` pass (declared by :class:`passes.flap.Flap`)."""

    def __init__(self, options: "FlapPass.Options"):
        self.options = options

    def settings(self) -> PrunerSettings:
        o = self.options
        settings = pruner_settings(
            o,
            aggregation="mean_z" if o.structure == "al-am" else "sum",
            allocator=o.allocator or ("global" if o.structure == "al-am" else "uniform"),
            sequential=o.sequential,
        )
        if o.parity:  # the reference code: no floors, no skipped layers, its threshold and statistics
            settings = replace(settings, min_heads=0, min_channels=0, skip_layers=(), reference_threshold=True,
                               reference_statistics=True)
        return settings

    def run(self, ctx) -> PlanStep:
        o = self.options
        scorer = ObsScorer() if o.metric == "obs" else FluctuationScorer(
            o.metric, parity=o.parity, square_attention=o.square_attention)
        step = StructuredPruner(scorer, self.settings()).run(ctx)
        step.pass_name, step.options = self.name, o.model_dump()
        return step
