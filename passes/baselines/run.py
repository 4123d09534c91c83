"""Baselines on the same scorer/allocator/surgeon parts: magnitude-sp and Wanda-sp."""

from __future__ import annotations

from pydantic import Field

from compress.plan import PlanStep
from compress.pruning.scores import MagnitudeScorer, WandaSpScorer
from compress.pruning.structured import PrunerSettings, StructuredPruner
from compress.registry import register_pass
from passes._common import ALLOCATOR_HELP, AllocatorName, StructuredOptions, pruner_settings


class _BaselineOptions(StructuredOptions):
    allocator: AllocatorName = Field("uniform", description=ALLOCATOR_HELP + " Default: uniform, as published.")


def _settings(options: _BaselineOptions, *, sequential: bool) -> PrunerSettings:
    aggregation = "sum" if options.allocator == "uniform" else "mean_z"
    return pruner_settings(options, aggregation=aggregation, allocator=options.allocator, sequential=sequential)


@register_pass("magnitude_sp")
class MagnitudeSpPass:
    """magnitude-sp: drop the units whose consumer columns have the smallest L2 norm. Data-free.

    A head scores the sum of its o_proj column norms, a channel its down_proj column norm. No bias.
    """

    kinds = ("decoder",)  # the model kinds it works on (compress.kinds)
    needs_calibration = False

    class Options(_BaselineOptions):
        pass

    def __init__(self, options: "MagnitudeSpPass.Options"):
        self.options = options

    def run(self, ctx) -> PlanStep:
        step = StructuredPruner(MagnitudeScorer(), _settings(self.options, sequential=False)).run(ctx)
        step.pass_name, step.options = self.name, self.options.model_dump()
        return step


@register_pass("wanda_sp")
class WandaSpPass:
    """Wanda-sp: |W| times input norm, averaged per channel; layers pruned in sequence. No bias.

    Each layer is scored on the outputs of the already-pruned layers before it, as in the
    reference implementation (``sequential: false`` scores everything on the dense model).
    """

    kinds = ("decoder",)  # the model kinds it works on (compress.kinds)
    needs_calibration = True

    class Options(_BaselineOptions):
        sequential: bool = Field(True, description="Score each layer on the outputs of the pruned layers before it.")

    def __init__(self, options: "WandaSpPass.Options"):
        self.options = options

    def run(self, ctx) -> PlanStep:
        settings = _settings(self.options, sequential=self.options.sequential)
        step = StructuredPruner(WandaSpScorer(), settings).run(ctx)
        step.pass_name, step.options = self.name, self.options.model_dump()
        return step
