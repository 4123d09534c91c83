"""Options shared by the structured pruning passes."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from compress.pruning.structured import PrunerSettings


class StructuredOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ratio: float = Field(gt=0.0, lt=1.0, description="Fraction of decoder attention+MLP linear weights to remove.")
    gqa: Literal["query_heads", "kv_groups"] = Field(
        "query_heads",
        description="Attention unit: 'query_heads' removes the same number of query heads from every KV group "
        "(KV heads stay); 'kv_groups' removes whole KV heads with their query heads.",
    )
    min_heads: int = Field(1, ge=0, description="Attention units (query-head slots or KV groups) every layer keeps.")
    min_channels: int = Field(1, ge=0, description="MLP channels every layer keeps.")
    skip_layers: list[int] = Field(
        default_factory=list,
        description="Layers never pruned (negative indices count from the end, e.g. [0, -1] keeps the first and last).",
    )
    round_to: int = Field(1, ge=1, description="Round each layer's kept MLP channels to a multiple of this (e.g. 64, 128).")
    block_metric: Literal["angular", "cosine", "mse"] = Field(
        "angular", description="block_budget allocator: how far a block turns its hidden state (mean per token)."
    )
    block_temperature: float = Field(
        0.075, gt=0, description="block_budget allocator: sigmoid temperature on the block distances; smaller "
        "gives more unequal blocks (0.075 matches the reference's 1e4 over 128 × 1024 summed tokens)."
    )

    compensation: Literal["bias", "least_squares", "none"] = Field(
        "none",
        description="After slicing: 'bias' adds the removed units' mean output (FLAP); 'least_squares' refits "
        "o_proj/down_proj on the kept inputs to reproduce the dense output on calibration data (ridge, "
        "closed form in float64) and adds the intercept as a bias; 'none' leaves the consumers as sliced.",
    )
    ls_damp: float = Field(
        1e-2, gt=0, description="least_squares: ridge strength relative to the mean diagonal of X^T X."
    )


AllocatorName = Literal["uniform", "global", "block_budget"]
ALLOCATOR_HELP = (
    "'uniform': every layer loses the same share; 'global': FLAP's standardised global threshold over all "
    "layers; 'block_budget': CFSP's per-block budget from how much each block changes the hidden state."
)


def pruner_settings(options: StructuredOptions, **method) -> PrunerSettings:
    """``PrunerSettings`` from the options every structured pass shares; ``method`` gives the rest
    (scorer-specific choices such as ``aggregation`` and ``allocator``) and may override any field."""
    shared = dict(
        ratio=options.ratio,
        gqa=options.gqa,
        min_heads=options.min_heads,
        min_channels=options.min_channels,
        round_to=options.round_to,
        skip_layers=tuple(options.skip_layers),
        compensation=options.compensation,
        ls_damp=options.ls_damp,
        block_metric=options.block_metric,
        block_temperature=options.block_temperature,
    )
    shared.update(method)
    return PrunerSettings(**shared)
