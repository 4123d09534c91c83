"""Per-channel statistics of a linear layer's input, accumulated in float64.

``x`` below is the input of a consumer layer (o_proj or down_proj) for a batch of calibration
windows, shape [b, t, channels]. One *sample* is one window.
"""

from __future__ import annotations

import torch


class ChannelStats:
    """Exact sums over every calibration token: sum x, sum x², token and sample counts.

    Gives the mean, the unbiased variance, and the per-sample squared norm that Wanda-sp and
    WIFN use: ``mean_samples sum_t x[t, j]²``.
    """

    def __init__(self, channels: int, device: torch.device | str = "cpu"):
        self.sum = torch.zeros(channels, dtype=torch.float64, device=device)
        self.sum_sq = torch.zeros(channels, dtype=torch.float64, device=device)
        self.tokens = 0
        self.samples = 0

    def update(self, x: torch.Tensor) -> None:
        """Add a batch ``x`` of shape [b, t, channels] (b samples of t tokens)."""
        x64 = x.detach().to(torch.float64).reshape(x.shape[0], -1, x.shape[-1])
        self.sum += x64.sum(dim=(0, 1))
        self.sum_sq += x64.square().sum(dim=(0, 1))
        self.tokens += x64.shape[0] * x64.shape[1]
        self.samples += x64.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        """[channels] mean over all tokens."""
        return self.sum / self.tokens

    @property
    def variance(self) -> torch.Tensor:
        """[channels] unbiased variance over all tokens."""
        n = self.tokens
        return (self.sum_sq - self.sum.square() / n) / (n - 1)

    @property
    def sample_sq_norm(self) -> torch.Tensor:
        """[channels] mean over samples of the squared token-norm ``sum_t x[t, j]²``."""
        return self.sum_sq / self.samples


class ReferenceFluctuation:
    """The FLAP reference code's streaming fluctuation estimate, for ``parity: true`` only.

    Per sample it updates the running mean first and then adds ``sum_t (x - mean_new)²``
    (the "old mean" in the reference aliases the updated one), scaled by ``(n-1)/n`` and
    ``1/(n+1)``; the first sample contributes nothing. Reproduced in float64.
    """

    def __init__(self, channels: int, device: torch.device | str = "cpu"):
        self.mean = torch.zeros(channels, dtype=torch.float64, device=device)
        self.fluctuation = torch.zeros(channels, dtype=torch.float64, device=device)
        self.samples = 0

    def update(self, x: torch.Tensor) -> None:
        x64 = x.detach().to(torch.float64)  # [b, t, c]
        tokens = x64.shape[1]
        sums = x64.sum(dim=1)  # [b, c]
        sums_sq = x64.square().sum(dim=1)  # [b, c]
        for s1, s2 in zip(sums, sums_sq):
            n = self.samples
            self.mean = self.mean * (n / (n + 1)) + (s1 / tokens) / (n + 1)
            if n == 0:
                self.fluctuation.zero_()
            else:
                deviation_sq = s2 - 2 * self.mean * s1 + tokens * self.mean.square()
                self.fluctuation = self.fluctuation * ((n - 1) / n) + deviation_sq / (n + 1)
            self.samples += 1

    @property
    def variance(self) -> torch.Tensor:
        return self.fluctuation
