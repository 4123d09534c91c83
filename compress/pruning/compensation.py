"""Least-squares compensation: refit a consumer's weights on its kept input channels.

When channels of a consumer's input (o_proj: head outputs, down_proj: MLP channels) are removed,
the consumer's output changes. ``least_squares_refit`` chooses new weights for the kept columns and
a bias so that, on the calibration activations X, the pruned consumer reproduces the dense one:

    minimise_{W', c}  sum_t || W' x_t[K] + c - W x_t ||^2  +  lambda ||W' - P||^2

with the prior P = 0 (plain ridge) or P = W[:, K] (ridge toward the dense weights). With
x~ = [x[K]; 1] this has a closed form built from the accumulated augmented second moment
G = sum_t [x_t; 1][x_t; 1]^T (float64), so no activations are stored:

    [W'^T; c] = (G[K1, K1] + lambda D)^-1 (G[K1, :n] W^T + lambda D [P^T; 0]),    K1 = K and the constant row,

D = identity on the weight rows, 0 on the bias row; lambda = damp * mean(diag(G[K, K])).
Toward the dense weights, damp = inf gives W' = W[:, K] and c = W[:, removed] · mean(x[removed]):
FLAP's bias compensation; damp = 0 the unregularised refit. :func:`choose_damp` picks damp per
consumer by the reconstruction error on held-out windows (:func:`refit_error`, exact from their
Gram), since a refit that fits the calibration text too closely is what fails on other text.
The existing bias of the consumer stays and c is added to it, as FLAP's bias compensation is.
"""

from __future__ import annotations

import math

import torch


class GramStats:
    """Accumulates G = sum_t [x_t; 1][x_t; 1]^T over every token of a consumer's input.

    x: [..., channels]; G: [channels + 1, channels + 1] float64 (the last row/column holds the
    channel sums and the token count).
    """

    def __init__(self, channels: int, device: torch.device | str = "cpu"):
        self.channels = channels
        self.matrix = torch.zeros(channels + 1, channels + 1, dtype=torch.float64, device=device)

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """Add the tokens of ``x`` [..., channels]; returns their augmented rows [tokens, channels + 1]
        (float64, on the statistics' device)."""
        flat = x.detach().reshape(-1, self.channels).to(device=self.matrix.device, dtype=torch.float64)
        ones = torch.ones(flat.shape[0], 1, dtype=torch.float64, device=flat.device)
        augmented = torch.cat([flat, ones], dim=1)
        self.matrix += augmented.T @ augmented
        return augmented

    @property
    def tokens(self) -> int:
        return int(self.matrix[-1, -1])

    @property
    def mean(self) -> torch.Tensor:
        """[channels] float64 per-token mean of the input (the constant row over the token count)."""
        return self.matrix[-1, :self.channels] / self.tokens


def add_ridge(matrix: torch.Tensor, damp: float, count: int | None = None) -> float:
    """Damp a square second-moment matrix in place: add ``damp · mean(diag[:count])`` to its first
    ``count`` diagonal entries (all of them by default; the rest, e.g. an augmented constant channel,
    stay). Where that mean is 0 (no signal at all) the ridge is 1, so the matrix stays invertible.
    Returns the ridge added. The least-squares refit, the drift correction and both OBS scores (FLAP's
    ``metric: obs``, SPA's OBSPA) damp through it."""
    diagonal = matrix.diagonal()[:count]
    scale = float(diagonal.mean()) if diagonal.numel() else 0.0
    ridge = damp * scale if scale > 0 else 1.0
    diagonal += ridge
    return ridge


DAMP_GRID = (0.0, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, math.inf)  # choose_damp's candidates


def least_squares_refit(weight: torch.Tensor, gram: GramStats, keep: list[int], damp: float = 1e-2,
                        prior: str = "zero") -> tuple[torch.Tensor, torch.Tensor]:
    """New consumer weights for the kept input channels and the bias to add.

    Args:
        weight: the dense consumer weight W [out, n].
        gram: the augmented second moment of the consumer's input (n channels).
        keep: kept input channel indices (ascending), |K| = k.
        damp: ridge strength relative to the mean diagonal of G[K, K] (``math.inf`` with the dense
            prior: FLAP's bias compensation).
        prior: "zero" (ridge toward 0) or "dense" (ridge toward W[:, K]).
    Returns:
        (W' [out, k] float64, c [out] float64).
    """
    n = gram.channels
    if weight.shape[1] != n:
        raise ValueError(f"weight has {weight.shape[1]} input channels, the statistics {n}")
    if gram.tokens == 0:
        raise ValueError("no calibration tokens were recorded for this consumer")
    if prior not in ("zero", "dense"):
        raise ValueError(f"unknown prior {prior!r}")
    G = gram.matrix
    W = weight.detach().to(device=G.device, dtype=torch.float64)
    keep_t = torch.tensor(list(keep), dtype=torch.long, device=G.device)
    k = len(keep)
    if math.isinf(damp):
        if prior != "dense":
            raise ValueError("an infinite ridge toward zero removes the consumer; use prior 'dense'")
        removed = torch.ones(n, dtype=torch.bool, device=G.device)
        removed[keep_t] = False
        return W[:, keep_t].contiguous(), W[:, removed] @ gram.mean[removed]
    rows = torch.cat([keep_t, torch.tensor([n], device=G.device)])
    system = G.index_select(0, rows).index_select(1, rows).clone()
    ridge = add_ridge(system, damp, k)
    target = G.index_select(0, rows)[:, :n] @ W.T  # [k+1, out]
    if prior == "dense":
        target[:k] += ridge * W[:, keep_t].T
    solution = torch.linalg.solve(system, target)
    return solution[:k].T.contiguous(), solution[k].contiguous()


def refit_error(weight: torch.Tensor, gram: GramStats, keep: list[int], refit: torch.Tensor,
                intercept: torch.Tensor) -> float:
    """sum_t || W' x_t[K] + c - W x_t ||^2 over the tokens ``gram`` summarises, exactly, from the
    Gram alone: tr(A^T G[K1,K1] A) - 2 tr(A^T G[K1,:n] W^T) + tr(W G[:n,:n] W^T), A = [W'^T; c]."""
    n = gram.channels
    G = gram.matrix
    W = weight.detach().to(device=G.device, dtype=torch.float64)
    rows = torch.tensor(list(keep) + [n], dtype=torch.long, device=G.device)
    A = torch.cat([refit.to(G).T, intercept.to(G)[None, :]], dim=0)  # [k+1, out]
    G_rows = G.index_select(0, rows)
    quadratic = (A * (G_rows.index_select(1, rows) @ A)).sum()
    cross = (A * (G_rows[:, :n] @ W.T)).sum()
    constant = (W.T * (G[:n, :n] @ W.T)).sum()
    return float(quadratic - 2 * cross + constant)


def choose_damp(weight: torch.Tensor, gram: GramStats, heldout: GramStats, keep: list[int], prior: str = "dense",
                grid: tuple[float, ...] = DAMP_GRID) -> tuple[float, torch.Tensor, torch.Tensor, dict[str, float]]:
    """The damp of ``grid`` whose refit (fitted on ``gram``) reconstructs the dense output best on
    the held-out tokens ``heldout``; returns (damp, W', c, held-out error per damp). Ties: the
    larger damp (the refit closer to the prior)."""
    candidates = [d for d in grid if not (math.isinf(d) and prior != "dense")]
    damp, (refit, intercept), errors = best_on_grid(
        candidates, lambda d: least_squares_refit(weight, gram, keep, d, prior),
        lambda fit: refit_error(weight, heldout, keep, *fit))
    return damp, refit, intercept, errors


def best_on_grid(grid, solve, error):
    """The damp of ``grid`` whose ``solve(damp)`` has the least ``error(solution)``; returns (damp,
    solution, error per damp keyed by ``str(damp)``). Ties: the later (larger) damp."""
    errors: dict[str, float] = {}
    best = None
    for damp in grid:
        solution = solve(damp)
        errors[str(damp)] = value = error(solution)
        if best is None or value <= best[0]:
            best = (value, damp, solution)
    return best[1], best[2], errors


class DriftStats:
    """What a drift correction of a pruned consumer needs, over tokens t: the augmented second moment
    G = sum_t [x_t; 1][x_t; 1]^T of its (kept) input x [.., k], the cross moment C = sum_t [x_t; 1] e_t^T
    with the error e = (dense model's block output) - (pruned block's output) [.., out], and
    s = sum_t ||e_t||^2; all float64."""

    def __init__(self, channels: int, outputs: int, device: torch.device | str = "cpu"):
        self.gram = GramStats(channels, device)
        self.cross = torch.zeros(channels + 1, outputs, dtype=torch.float64, device=device)
        self.error_energy = 0.0

    def update(self, x: torch.Tensor, error: torch.Tensor) -> None:
        augmented = self.gram.update(x)
        err = error.detach().reshape(-1, self.cross.shape[1]).to(device=self.cross.device, dtype=torch.float64)
        self.cross += augmented.T @ err
        self.error_energy += float(err.square().sum())


def drift_delta(stats: DriftStats, damp: float) -> torch.Tensor:
    """The change [k + 1, out] of a consumer's [W^T; c] that best removes the drift on ``stats``:
    argmin_D sum_t ||e_t - D^T [x_t; 1]||^2 + lambda ||D[:k]||^2, lambda = damp * mean(diag G[:k, :k])
    (a ridge toward the current weights; the bias row is free). ``damp = inf``: no change."""
    G, k = stats.gram.matrix, stats.gram.channels
    if math.isinf(damp):
        return torch.zeros_like(stats.cross)
    system = G.clone()
    add_ridge(system, damp, k)
    return torch.linalg.solve(system, stats.cross)


def drift_error(stats: DriftStats, delta: torch.Tensor) -> float:
    """sum_t ||e_t - delta^T [x_t; 1]||^2 on the tokens ``stats`` summarises, from its moments alone."""
    return float(stats.error_energy - 2 * (delta * stats.cross).sum() + (delta * (stats.gram.matrix @ delta)).sum())


def choose_drift_damp(fit: DriftStats, heldout: DriftStats,
                      grid: tuple[float, ...] = DAMP_GRID) -> tuple[float, torch.Tensor, dict[str, float]]:
    """The damp of ``grid`` whose correction (fitted on ``fit``) leaves the least drift on the held-out
    tokens; returns (damp, delta [k + 1, out], held-out drift per damp). Ties: the larger damp."""
    return best_on_grid(grid, lambda damp: drift_delta(fit, damp), lambda delta: drift_error(heldout, delta))
