"""The ``heads`` pass, declared: name, options and what it needs (light; run by passes.heads.run)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from compress.registry import register_pass


@register_pass("heads", implementation="passes.heads.run:HeadsPass")
class Heads:
    """Attention-head pruning for encoders: score heads, remove the least important, slice q/k/v/o.

    Scores: 'taylor_gate' (Michel et al.: |dL/dξ| of a head gate, label-free contrastive loss),
    'output_norm' (the head's contribution to the residual stream, SpAtten-style static ranking),
    'usage_top1' (tokens for which the head contributes most), 'ablation' (exact leave-one-out
    change of the layer output) and 'weight_norm' (data-free). Removes heads one-shot or in
    iterative rounds with re-scoring, to a head budget (`ratio`) or until a quality floor on the
    calibration embeddings is reached. Optionally also removes FFN channels with the same surgeon.
    """

    kinds = ("encoder",)  # the model kinds it works on (compress.kinds)
    needs_calibration = True
    ratio_of = "heads"  # `ratio` is a share of the attention heads

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

        score: Literal["taylor_gate", "output_norm", "usage_top1", "ablation", "weight_norm"] = Field(
            "output_norm", description="Head importance (see the pass description; weight_norm needs no data).")
        ratio: float = Field(0.25, ge=0, lt=1, description="Share of all attention heads to remove (the head budget; "
                             "with quality_floor, the most that may be removed).")
        allocator: Literal["uniform", "global"] = Field(
            "global", description="'uniform': the same share in every layer; 'global': one ranking over all layers "
            "(of normalised scores, see normalize), so layers end up with different head counts.")
        normalize: Literal["michel", "none"] = Field(
            "michel", description="'michel': per-layer L2 normalisation then global min-max (bertology's defaults); "
            "'none': raw scores.")
        schedule: Literal["one_shot", "iterative"] = Field(
            "one_shot", description="'iterative': remove `step` of all heads per round and re-score the masked model "
            "(Michel et al.'s procedure).")
        step: float = Field(0.1, gt=0, le=1, description="Iterative: share of all heads removed per round.")
        quality_floor: Optional[float] = Field(
            None, gt=0, le=1, description="Stop before the mean cosine between masked and dense calibration "
            "embeddings falls below this (the last round above it is kept); implies iterative removal.")
        min_heads_per_layer: int = Field(1, ge=0, description="Heads every layer keeps.")
        allow_empty_layers: bool = Field(
            False, description="Let a layer lose every head: its attention is then replaced by the output "
            "projection's bias (exact). Overrides min_heads_per_layer.")
        compensation: Literal["bias", "none"] = Field(
            "bias", description="'bias': add the removed heads' mean contribution on the calibration data to the "
            "output projection's bias (FLAP's bias compensation; exact on average); 'none': just remove them.")
        ffn_ratio: float = Field(0.0, ge=0, lt=1, description="Share of each layer's FFN channels to remove too.")
        ffn_score: Literal["output_norm", "weight_norm"] = Field(
            "output_norm", description="FFN channel importance: mean |activation| × ‖down column‖, or weight norms.")

        @model_validator(mode="after")
        def _floor(self):
            if self.min_heads_per_layer == 0 and not self.allow_empty_layers:
                raise ValueError("min_heads_per_layer: 0 removes whole attention blocks; set allow_empty_layers: true")
            return self
