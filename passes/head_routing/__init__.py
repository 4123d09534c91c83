"""The ``head_routing`` pass, declared: name, options and what it needs (light; run by passes.head_routing.run)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from compress.registry import register_pass
from passes._common import KeepCount


@register_pass("head_routing", implementation="passes.head_routing.run:HeadRoutingPass")
class HeadRouting:
    """Head routing (SHRP deployment rule): keep, per layer, the heads that carry the most calibration examples.

    Counts, per layer, for how many calibration examples each head has the largest residual
    contribution (top-1 usage), keeps the `keep` most used heads of every layer and slices the
    rest away. The counts are recorded in the plan. The training-time router of SHRP is not part
    of this pass (see docs/heads.md).
    """

    kinds = ("encoder",)  # the model kinds it works on (compress.kinds)
    needs_calibration = True
    ratio_of = "heads"  # `ratio` is a share of the attention heads

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

        keep: KeepCount = Field(
            description="Heads each layer keeps: a whole number is a count, a value in (0, 1) a fraction of "
            "the layer's heads (rounded, at least 1).")
