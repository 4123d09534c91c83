"""The ``cfsp`` pass, declared: name, options and what it needs (light; run by passes.cfsp.run)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from compress.registry import register_pass
from passes._common import ALLOCATOR_HELP, AllocatorName, StructuredOptions


@register_pass("cfsp", implementation="passes.cfsp.run:CfspPass")
class Cfsp:
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
