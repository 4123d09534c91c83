"""The ``flap`` pass, declared: name, options and what it needs (light; run by passes.flap.run)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from compress.registry import register_pass
from passes._common import ALLOCATOR_HELP, AllocatorName, StructuredOptions


@register_pass("flap", implementation="passes.flap.run:FlapPass")
class Flap:
    """FLAP: drop heads and MLP channels whose inputs fluctuate least; compensate with a bias.

    Scores each o_proj/down_proj input channel by its variance on calibration text weighted by
    the column energy of the weights that read it (WIFV), standardises per layer, cuts all layers
    with one cost-weighted global threshold (AL-AM), and replaces each removed unit by its mean
    contribution as a bias.
    """

    kinds = ("decoder",)  # the model kinds it works on (compress.kinds)
    needs_calibration = True
    streams = True  # runs out of core (max_memory), block by block

    class Options(StructuredOptions):
        gqa: Literal["query_heads", "kv_groups"] = Field(
            "kv_groups",
            description="Attention unit: 'kv_groups' (default) removes whole KV heads with their query heads; "
            "'query_heads' removes the same number of query heads from every KV group (KV heads stay).",
        )
        skip_layers: list[int] = Field(
            default_factory=lambda: [0, -1],
            description="Layers never pruned (negative indices count from the end); default: the first and last.",
        )
        metric: Literal["wifv", "ifv", "wifn", "obs"] = Field(
            "wifv", description="Channel score: WIFV (default), IFV, WIFN, or 'obs': the output error left after "
            "the least-squares refit (Optimal Brain Surgeon; each head scored as a whole; needs compensation: "
            "least_squares; square_attention does not apply)."
        )
        structure: Literal["al-am", "ul-um"] = Field(
            "al-am", description="'al-am': one global threshold over standardised scores (adaptive widths); "
            "'ul-um': every layer loses the same share."
        )
        allocator: AllocatorName | None = Field(
            None, description=ALLOCATOR_HELP + " Default (null): the one `structure` implies."
        )
        compensation: Literal["bias", "least_squares", "none"] = Field(
            "bias", description="'bias' (FLAP): add the removed units' mean output; 'least_squares': refit "
            "o_proj/down_proj on the kept inputs (see docs/recipes.md); 'none'."
        )
        sequential: bool = Field(
            False,
            description="Re-score each layer on the outputs of the already-pruned layers before slicing it "
            "(widths stay as allocated on the dense model; costs one more calibration pass).",
        )
        square_attention: bool = Field(
            True, description="Square the attention channel scores before standardising, as the reference code does."
        )
        parity: bool = Field(
            False,
            description="Reproduce the reference code: streaming variance, squared attention score, "
            "argmin threshold with strict '>', no per-layer floor and no skipped layers, fp16-rounded means.",
        )

        @model_validator(mode="after")
        def _obs_needs_a_refit(self):
            if self.metric == "obs" and self.compensation != "least_squares":
                raise ValueError("metric 'obs' scores the error left after a least-squares refit, so it needs "
                                 f"compensation: least_squares (compensation is {self.compensation!r})")
            if self.metric == "obs" and self.parity:
                raise ValueError("metric 'obs' is not the reference code's score: parity needs metric 'wifv'")
            return self
