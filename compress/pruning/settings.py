"""``PrunerSettings``: how the structured pruner prunes (a plain dataclass, no torch), so the pass
declarations can build it without importing the engine (:mod:`compress.pruning.structured`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PrunerSettings:
    """How to prune. See the pass options for the meaning of each field."""

    ratio: float
    gqa: str = "query_heads"  # "query_heads" | "kv_groups"
    aggregation: str = "mean_z"  # "mean_z" | "sum"
    allocator: str = "global"  # "global" | "uniform" | "block_budget"
    compensation: str = "bias"  # "bias" | "least_squares" | "none"
    ls_damp: float | None = 1e-2  # least_squares: ridge strength (relative to mean diag X^T X); None = auto
    ls_prior: str = "zero"  # least_squares: ridge toward "zero" or toward the "dense" weights
    ls_target: str = "consumer"  # least_squares: "consumer" | "dense_output" (sequential: down_proj absorbs the drift)
    min_heads: int = 1
    min_channels: int = 1
    round_to: int = 1
    sequential: bool = False
    skip_layers: tuple[int, ...] = ()  # never pruned; negative indices count from the last layer
    reference_threshold: bool = False  # FLAP parity: argmin threshold with strict ">"
    reference_statistics: bool = False  # FLAP parity: streaming variance, fp16-rounded means
    prune_attention: bool = True  # False: attention units are all kept (MLP-only pruning)
    block_metric: str = "angular"  # block_budget: "angular" | "cosine" | "mse"
    block_temperature: float = 0.075  # block_budget: sigmoid temperature on the mean token distance
    search_evaluations: int = 240  # search: candidate allocations tried
    search_windows: int = 8  # search: held-out windows the KL is measured on
    search_seed: int = 0
