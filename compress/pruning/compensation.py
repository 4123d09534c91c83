"""Least-squares compensation: refit a consumer's weights on its kept input channels.

When channels of a consumer's input (o_proj: head outputs, down_proj: MLP channels) are removed,
the consumer's output changes. ``least_squares_refit`` chooses new weights for the kept columns and
a bias so that, on the calibration activations X, the pruned consumer reproduces the dense one:

    minimise_{W', c}  sum_t || W' x_t[K] + c - W x_t ||^2  +  lambda ||W'||^2

With x~ = [x[K]; 1] this is ridge regression with a closed form built from the accumulated
augmented second moment G = sum_t [x_t; 1][x_t; 1]^T (float64), so no activations are stored:

    [W'^T; c] = (G[K1, K1] + lambda D)^-1 G[K1, :n] W^T,    K1 = K plus the constant row,

D = identity on the weight rows, 0 on the bias row; lambda = damp * mean(diag(G[K, K])).
The existing bias of the consumer stays and c is added to it, as FLAP's bias compensation is.
"""

from __future__ import annotations

import torch


class GramStats:
    """Accumulates G = sum_t [x_t; 1][x_t; 1]^T over every token of a consumer's input.

    x: [..., channels]; G: [channels + 1, channels + 1] float64 (the last row/column holds the
    channel sums and the token count).
    """

    def __init__(self, channels: int, device: torch.device | str = "cpu"):
        self.channels = channels
        self.matrix = torch.zeros(channels + 1, channels + 1, dtype=torch.float64, device=device)

    def update(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, self.channels).to(device=self.matrix.device, dtype=torch.float64)
        ones = torch.ones(flat.shape[0], 1, dtype=torch.float64, device=flat.device)
        augmented = torch.cat([flat, ones], dim=1)
        self.matrix += augmented.T @ augmented

    @property
    def tokens(self) -> int:
        return int(self.matrix[-1, -1])


def least_squares_refit(weight: torch.Tensor, gram: GramStats, keep: list[int], damp: float = 1e-2
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """New consumer weights for the kept input channels and the bias to add.

    Args:
        weight: the dense consumer weight W [out, n].
        gram: the augmented second moment of the consumer's input (n channels).
        keep: kept input channel indices (ascending), |K| = k.
        damp: ridge strength relative to the mean diagonal of G[K, K].
    Returns:
        (W' [out, k] float64, c [out] float64).
    """
    n = gram.channels
    if weight.shape[1] != n:
        raise ValueError(f"weight has {weight.shape[1]} input channels, the statistics {n}")
    if gram.tokens == 0:
        raise ValueError("no calibration tokens were recorded for this consumer")
    G = gram.matrix
    rows = torch.tensor(list(keep) + [n], dtype=torch.long, device=G.device)
    system = G.index_select(0, rows).index_select(1, rows).clone()
    k = len(keep)
    ridge = damp * system.diagonal()[:k].mean().clamp_min(1e-12)
    system.diagonal()[:k] += ridge
    target = G.index_select(0, rows)[:, :n] @ weight.detach().to(device=G.device, dtype=torch.float64).T  # [k+1, out]
    solution = torch.linalg.solve(system, target)
    return solution[:k].T.contiguous(), solution[k].contiguous()
