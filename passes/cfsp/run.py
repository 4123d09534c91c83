"""CFSP: coarse-to-fine structured pruning (Wang et al., COLING 2025).

Coarse: each block's keep ratio comes from how far it turns the hidden state on calibration text
(the ``block_budget`` allocator). Fine: inside each block, the channels with the highest CFSP score
survive. By default only MLP channels are pruned, as in the paper; ``attention: true`` lets the
block budget take heads (or KV groups) too.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from compress.plan import PlanStep
from compress.pruning.scores import CfspScorer
from compress.pruning.structured import PrunerSettings, StructuredPruner
from compress.registry import register_pass
from passes._common import ALLOCATOR_HELP, AllocatorName, StructuredOptions, pruner_settings


@register_pass("cfsp")
class CfspPass:
    """CFSP: per-block budgets from block importance (angular distance), channels by the CFSP score.

    ``ratio`` is the fraction of decoder attention+MLP linear weights removed, as for every pass.
    With the default MLP-only pruning, the MLP loses a larger share so that the total matches:
    on SmolLM2, 0.5 of the decoder linears is about 0.67 of the MLP channels.
    """

    kinds = ("decoder",)  # the model kinds it works on (compress.kinds)
    needs_calibration = True

    class Options(StructuredOptions):
        score: Literal["intended", "reference"] = Field(
            "intended",
            description="Fine channel score: 'intended' normalises each weight term across channels (weights "
            "matter); 'reference' is the released code's, which reduces to the activation norm.",
        )
        attention: bool = Field(False, description="Also prune attention units within each block's budget.")
        allocator: AllocatorName = Field("block_budget", description=ALLOCATOR_HELP)
        b: float = Field(1.0, ge=0, description="Exponent of the activation norm inside the down_proj term.")
        c: float = Field(1.0, ge=0, description="Exponent of the activation norm multiplying the score.")
        sequential: bool = Field(False, description="Re-score each layer on the already-pruned upstream layers.")

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
