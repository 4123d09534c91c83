"""Baselines on the same scorer/allocator/surgeon parts: magnitude-sp and Wanda-sp.

The passes' names, options and docs are declared in :mod:`passes.baselines`; this is what runs them.
"""

from __future__ import annotations

from compress.plan import PlanStep
from compress.pruning.scores import MagnitudeScorer, WandaSpScorer
from compress.pruning.structured import PrunerSettings, StructuredPruner
from passes._common import pruner_settings
from passes.baselines import BaselineOptions, MagnitudeSp, WandaSp


def _settings(options: BaselineOptions, *, sequential: bool) -> PrunerSettings:
    aggregation = "sum" if options.allocator == "uniform" else "mean_z"
    return pruner_settings(options, aggregation=aggregation, allocator=options.allocator, sequential=sequential)


class MagnitudeSpPass(MagnitudeSp):
    """Runs the ``magnitude_sp`` pass (declared by :class:`passes.baselines.MagnitudeSp`)."""

    def __init__(self, options: "MagnitudeSpPass.Options"):
        self.options = options

    def run(self, ctx) -> PlanStep:
        step = StructuredPruner(MagnitudeScorer(), _settings(self.options, sequential=False)).run(ctx)
        step.pass_name, step.options = self.name, self.options.model_dump()
        return step


class WandaSpPass(WandaSp):
    """Runs the ``wanda_sp`` pass (declared by :class:`passes.baselines.WandaSp`)."""

    def __init__(self, options: "WandaSpPass.Options"):
        self.options = options

    def run(self, ctx) -> PlanStep:
        settings = _settings(self.options, sequential=self.options.sequential)
        step = StructuredPruner(WandaSpScorer(), settings).run(ctx)
        step.pass_name, step.options = self.name, self.options.model_dump()
        return step
