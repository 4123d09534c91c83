"""The ``moe_experts`` pass, declared: name, options and what it needs (light; run by passes.moe_experts.run)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from compress.recipe import TextSource
from compress.registry import register_pass
from compress.schema import Seed
from passes._common import KeepCount


@register_pass("moe_experts", implementation="passes.moe_experts.run:MoeExpertsPass")
class MoeExperts:
    """MoE expert pruning: keep the best routed experts per layer and slice the router to match.

    Scores every routed expert from one calibration forward (EASY-EP, REAP, frequency or soft
    frequency), keeps `keep` experts per sparse layer (uniform, or a global ranking with a floor
    of top_k + 1 per layer), and cuts the expert tensors and router rows, so the kept experts are
    routed as the original router would route them with the pruned ones at -inf (exact for
    renormalising routers). Shared experts are never pruned. The plan records, per layer, the kept
    ids in the original numbering, the ranking of all experts, their scores and token counts.
    """

    kinds = ("moe",)  # the model kinds it works on (compress.kinds)
    needs_calibration = True
    replays_details = True  # `compress apply` replays the step from its JSON details (no tensors)

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

        keep: KeepCount = Field(
            description="Experts each sparse layer keeps: a whole number is a count (e.g. 6), a value in (0, 1) a "
            "fraction of the layer's experts (e.g. 0.5). With allocator: global, the total budget."
        )
        score: Literal["easy_ep", "reap", "frequency", "soft_frequency"] = Field(
            "easy_ep",
            description="'easy_ep': sum over tokens of gate × expert-output norm × token contribution "
            "max(1 − cos(h, h + R), 0); 'reap': mean over routed tokens of gate × expert-output norm; "
            "'frequency': tokens routed; 'soft_frequency': sum of routing weights.",
        )
        allocator: Literal["uniform", "global"] = Field(
            "uniform",
            description="'uniform': the same count in every layer (the export loads with stock transformers); "
            "'global': one ranking of per-layer mean-normalised scores over all layers, each layer keeping "
            "at least top_k + 1 (different counts per layer export with a pruned_moe config and its modeling file, "
            "which loads with trust_remote_code=True or once compress is imported).",
        )
        top_k: Optional[int] = Field(
            None, ge=1, description="New experts per token (may only be lowered; null keeps the model's)."
        )
        source: Optional[TextSource] = Field(
            None, description="Text of the in-domain demonstrations to score on; null: the recipe's calibration windows."
        )
        samples: int = Field(32, ge=1, description="With `source`: number of random windows.")
        seqlen: int = Field(128, ge=2, description="With `source`: tokens per window.")
        seed: Seed = Field(0, description="With `source`: seed for the window positions.")
