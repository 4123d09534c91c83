"""OBSPA (experimental): Optimal-Brain-Surgeon saliency of group units and compensation of consumers.

A consumer weight, viewed as ``W`` [rows, C] with its input channels last (``consumer_matrix``),
maps the channel vector x [C] it reads. With ``H = Σ x xᵀ + λ·mean(diag)·I`` (damped), removing the
channel set S raises ``‖W X - W' X‖²`` by at least

    E_S = trace( W[:, S] · (H⁻¹[S, S])⁻¹ · W[:, S]ᵀ )

when the other columns are corrected optimally. A unit's saliency is the sum of E_S over the
group's consumer slices (S = the unit's channels there; producer rows vanish with no error of
their own). Each unit is scored once against the full H⁻¹: the scores are not downdated as units
go, so units that are only removable together are judged one at a time.

Compensation refits the kept columns K of every consumer once the cut is known (least squares,
equal to OBS's update for the whole removed set): ``W'[:, K] = (W·H)[:, K] · H[K, K]⁻¹``.

Where H comes from is the ``hessian`` option of the pass: ``identity`` (no data and no forward
pass: E_S = ‖W[:, S]‖², and compensation changes nothing), ``synthetic`` (random token ids, or
standard-normal float inputs, run through the model: a function of the weights and a seed, no
dataset), or ``calibration`` (text).
"""

from __future__ import annotations

import torch

from compress.errors import CompressError
from compress.pruning.compensation import add_ridge
from compress.pruning.groups import ChannelGroup
from passes.spa.activations import ConsumerInput, InputStats, consumer_matrix


def damped(gram: torch.Tensor, damp: float) -> torch.Tensor:
    """[C, C] float64 ``gram + damp·mean(diag)·I`` (identity where the gram is all zero)."""
    gram = gram.to(torch.float64).clone()
    add_ridge(gram, damp)
    return gram


def unit_saliency(weight: torch.Tensor, hinv: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
    """[U] OBS error of removing each unit alone.

    weight: [rows, C] consumer matrix; hinv: [C, C] inverse of the damped H; units: [U, k] the
    channel indices of each unit (all units of a slice have the same k)."""
    block = hinv[units[:, :, None], units[:, None, :]]  # [U, k, k]
    columns = weight[:, units].permute(1, 2, 0)  # [U, k, rows]
    return (columns * torch.linalg.solve(block, columns)).sum(dim=(1, 2))


class ObsScorer:
    """OBS saliencies of group units from consumer weights and their input Hessians.

    hessians: activation name -> [C, C] float64 damped H; inputs: consumer weight -> its activation.
    """

    def __init__(self, hessians: dict[str, torch.Tensor], inputs: dict[str, ConsumerInput]):
        self.hessians = hessians
        self.inputs = inputs
        self._inverse: dict[str, torch.Tensor] = {}

    def inverse(self, activation: str) -> torch.Tensor:
        if activation not in self._inverse:
            self._inverse[activation] = torch.cholesky_inverse(torch.linalg.cholesky(self.hessians[activation]))
        return self._inverse[activation]

    def scores(self, group: ChannelGroup, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """[units] float64 saliency of each unit of ``group`` (sum over its consumer slices)."""
        total = torch.zeros(group.units, dtype=torch.float64)
        used = False
        for piece in group.slices:
            source = self.inputs.get(piece.tensor)
            if piece.role != "consumer" or source is None or source.activation not in self.hessians:
                continue
            weight = consumer_matrix(tensors[piece.tensor].to(torch.float64), piece.axis)
            hinv = self.inverse(source.activation)
            if hinv.shape[0] != weight.shape[1]:
                continue
            units = torch.stack([piece.indices([u]) for u in range(group.units)])
            total += unit_saliency(weight, hinv, units)
            used = True
        if not used:
            raise CompressError(f"group {group.id} ({group.label}): OBS needs a consumer MatMul/Gemm/Conv whose "
                                "input statistics were collected")
        return total


def refit_kept_columns(weight: torch.Tensor, hessian: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """[rows, C] consumer matrix with columns ``kept`` refit to ``(W·H)[:, K] · H[K, K]⁻¹`` (the
    removed columns are left as they are: surgery drops them). ``hessian`` is the damped H."""
    refit = weight.clone()
    target = weight @ hessian[:, kept]  # [rows, |K|]
    refit[:, kept] = torch.linalg.solve(hessian[kept][:, kept], target.T).T
    return refit


def compensate(tensors: dict[str, torch.Tensor], kept_channels: dict[tuple[str, int], torch.Tensor],
               hessians: dict[str, torch.Tensor], inputs: dict[str, ConsumerInput]) -> dict[str, torch.Tensor]:
    """Consumer weights refit to their kept input channels, in their original layout and dtype.

    kept_channels: (tensor, axis) -> kept indices along that axis, for every axis the cut shrinks;
    only the consumer axes of tensors with a collected Hessian are refit."""
    refit = {}
    for (name, axis), kept in kept_channels.items():
        source = inputs.get(name)
        if source is None or source.activation not in hessians:
            continue
        original = tensors[name]
        axis = axis % original.dim()
        moved = original.movedim(axis, -1)
        if moved.shape[-1] != hessians[source.activation].shape[0]:
            continue
        matrix = refit_kept_columns(moved.reshape(-1, moved.shape[-1]).to(torch.float64),
                                    hessians[source.activation], torch.as_tensor(kept, dtype=torch.long))
        refit[name] = matrix.reshape(moved.shape).movedim(-1, axis).to(original.dtype).contiguous()
    return refit


def stats_hessians(stats: dict[str, InputStats], damp: float) -> dict[str, torch.Tensor]:
    """activation -> damped [C, C] H from collected second moments."""
    return {name: damped(torch.from_numpy(entry.gram), damp) for name, entry in stats.items()}
