"""Coarse block importance: how far each decoder block turns the hidden state (CFSP's coarse signal).

For block i with input x_in and output x_out (hidden states, residual included), per token:

    angular  arccos(cos(x_in, x_out)) / pi     (default; in [0, 1])
    cosine   1 - cos(x_in, x_out)
    mse      mean over hidden of (x_out - x_in)^2

The importance of a block is the **mean** over every calibration token (float64), so it does not
grow with the number or length of the windows (the reference code sums, which ties its fixed
temperature to the sample count). Larger means more important.
"""

from __future__ import annotations

import torch

BLOCK_METRICS = ("angular", "cosine", "mse")


def token_distance(x_in: torch.Tensor, x_out: torch.Tensor, metric: str = "angular") -> torch.Tensor:
    """Per-token distance between x_in and x_out [..., hidden] -> [...] (float64)."""
    a, b = x_in.double(), x_out.double()
    if metric == "mse":
        return (b - a).pow(2).mean(dim=-1)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1).clamp(-1.0, 1.0)
    if metric == "cosine":
        return 1.0 - cos
    if metric == "angular":
        return torch.arccos(cos) / torch.pi
    raise ValueError(f"unknown block metric {metric!r}; choose from {', '.join(BLOCK_METRICS)}")


class BlockDistance:
    """Accumulates one block's mean token distance over calibration batches."""

    def __init__(self, metric: str = "angular"):
        if metric not in BLOCK_METRICS:
            raise ValueError(f"unknown block metric {metric!r}; choose from {', '.join(BLOCK_METRICS)}")
        self.metric = metric
        self.total = 0.0
        self.tokens = 0

    def update(self, x_in: torch.Tensor, x_out: torch.Tensor) -> None:
        distance = token_distance(x_in, x_out, self.metric)
        self.total += float(distance.sum())
        self.tokens += distance.numel()

    @property
    def value(self) -> float:
        return self.total / self.tokens if self.tokens else 0.0


@torch.no_grad()
def measure_block_importance(adapter, input_ids: torch.Tensor, batch_size: int = 16, metric: str = "angular",
                             progress: bool = False) -> list[float]:
    """Importance of every block of ``adapter``'s model on ``input_ids`` [n, seqlen]: one dense pass,
    block by block. Returns one float per layer (larger = the block changes the hidden state more)."""
    from compress.calibration.runner import LayerRunner

    runner = LayerRunner(adapter, input_ids, batch_size=batch_size, progress=progress)
    runner.capture_inputs()
    importance = []
    for i in runner.blocks("block importance"):
        before = list(runner.hidden)
        runner.run_block(i, update=True)
        distance = BlockDistance(metric)
        for x_in, x_out in zip(before, runner.hidden):
            distance.update(x_in, x_out)
        importance.append(distance.value)
    return importance
