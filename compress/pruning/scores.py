"""Channel scorers: importance of each input channel of o_proj (per head dim) and down_proj.

A scorer turns one layer's consumer weights and (optionally) its calibration statistics into
``LayerScores``. Scores are float64. o_proj channel ``h·head_dim + k`` belongs to query head h.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from compress.calibration.stats import ChannelStats, ReferenceFluctuation
from compress.pruning.compensation import GramStats, add_ridge


@dataclass
class ConsumerStats:
    """Statistics of one layer's two consumer inputs (o_proj, down_proj)."""

    attn: ChannelStats
    mlp: ChannelStats
    attn_reference: ReferenceFluctuation | None = None  # parity mode only
    mlp_reference: ReferenceFluctuation | None = None
    attn_gram: "GramStats | None" = None  # least-squares compensation only
    mlp_gram: "GramStats | None" = None
    attn_heldout: "GramStats | None" = None  # least squares with ls_damp auto: held-out windows' Gram
    mlp_heldout: "GramStats | None" = None


@dataclass
class LayerScores:
    """Importance per channel of one layer. attn: [heads·head_dim]; mlp: [intermediate]."""

    attn: torch.Tensor
    mlp: torch.Tensor


def _column_energy(weight: torch.Tensor) -> torch.Tensor:
    """[in] sum over output rows of W[i, j]²."""
    return weight.detach().to(torch.float64).square().sum(dim=0)


def _column_mean_abs(weight: torch.Tensor) -> torch.Tensor:
    """[in] mean over output rows of |W[i, j]|."""
    return weight.detach().to(torch.float64).abs().mean(dim=0)


def _column_norm(weight: torch.Tensor) -> torch.Tensor:
    """[in] L2 norm of each column."""
    return weight.detach().to(torch.float64).square().sum(dim=0).sqrt()


class FluctuationScorer:
    """FLAP's fluctuation metrics.

    * WIFV: ``var_j · sum_i W[i, j]²`` (default)
    * IFV:  ``var_j``
    * WIFN: ``mean_i |W[i, j]| · sqrt(mean_samples sum_t x[t, j]²)``

    With ``parity`` the variance is the reference code's streaming estimate and the attention
    score is squared, as in the reference implementation (``square_attention`` squares alone).
    """

    needs_activations = True

    def __init__(self, metric: str = "wifv", parity: bool = False, square_attention: bool = False):
        self.metric = metric.lower()
        self.parity = parity
        self.square_attention = square_attention or parity

    def _score(self, weight: torch.Tensor, stats: ChannelStats, reference: ReferenceFluctuation | None) -> torch.Tensor:
        if self.metric == "wifn":
            return _column_mean_abs(weight) * stats.sample_sq_norm.sqrt()
        variance = reference.variance if (self.parity and reference is not None) else stats.variance
        if self.metric == "ifv":
            return variance.clone()
        return variance * _column_energy(weight)

    def __call__(self, adapter, layer_index: int, stats: ConsumerStats) -> LayerScores:
        attn = self._score(adapter.attention_consumer(layer_index).weight, stats.attn, stats.attn_reference)
        mlp = self._score(adapter.mlp_consumer(layer_index).weight, stats.mlp, stats.mlp_reference)
        if self.square_attention:
            attn = attn.square()
        return LayerScores(attn=attn, mlp=mlp)


class ObsScorer:
    """Optimal-Brain-Surgeon saliency for a least-squares refit (SlimGPT / ZipLM style).

    A consumer ``W`` [out, C] reads inputs x [C]; ``G`` is their Gram matrix per token with the constant
    channel appended ([C + 1, C + 1], ``GramStats``), so the refit may also move the bias. Removing
    the input channels S and refitting the others (and the bias) optimally raises the mean squared
    output error by ``E_S = trace(W_S · (Ĝ⁻¹)_SS⁻¹ · W_Sᵀ)``, Ĝ being G damped by ``damp · mean(diag)``.
    For one channel that is ``‖W[:, j]‖² / (Ĝ⁻¹)_jj``: its weight energy times the variance of x_j
    that the other channels cannot predict (where FLAP's WIFV takes the whole variance).

    MLP channels (down_proj inputs) are scored one by one; each query head's ``head_dim`` o_proj
    channels are scored as one set and share its ``E_S`` equally, so a head's summed score is its
    error. Scores are float64. Needs the Gram statistics (``needs_gram``).
    """

    needs_activations = True
    needs_gram = True

    def __init__(self, damp: float = 1e-2):
        self.damp = damp

    def damped_inverse(self, gram: GramStats) -> torch.Tensor:
        """[C + 1, C + 1] inverse of the damped per-token Gram, the constant channel included."""
        if gram is None:
            raise ValueError("the OBS score needs the consumers' Gram statistics (compensation: least_squares)")
        damped = gram.matrix / max(gram.tokens, 1)
        add_ridge(damped, self.damp, gram.channels)
        return torch.cholesky_inverse(torch.linalg.cholesky(damped))

    def _inverse(self, gram: GramStats) -> torch.Tensor:
        """[C, C] block of ``damped_inverse`` for the channels (the constant channel kept in the fit)."""
        return self.damped_inverse(gram)[:gram.channels, :gram.channels]

    def channel_errors(self, weight: torch.Tensor, gram: GramStats) -> torch.Tensor:
        """[C] ``E_j`` of each input channel alone."""
        diagonal = self._inverse(gram).diagonal()
        return _column_energy(weight).to(diagonal.device) / diagonal

    def block_errors(self, weight: torch.Tensor, gram: GramStats, size: int) -> torch.Tensor:
        """[C] ``E_S / size`` for each channel of the consecutive blocks S of ``size`` channels."""
        inverse = self._inverse(gram)
        w = weight.detach().to(device=inverse.device, dtype=torch.float64)
        errors = []
        for start in range(0, inverse.shape[0], size):
            block = slice(start, start + size)
            w_s = w[:, block]  # [out, size]
            solved = torch.linalg.solve(inverse[block, block], w_s.T)  # [size, out]
            errors.append((w_s.T * solved).sum() / size)
        return torch.stack(errors).repeat_interleave(size)

    def __call__(self, adapter, layer_index: int, stats: ConsumerStats) -> LayerScores:
        attn = self.block_errors(adapter.attention_consumer(layer_index).weight, stats.attn_gram, adapter.head_dim)
        mlp = self.channel_errors(adapter.mlp_consumer(layer_index).weight, stats.mlp_gram)
        return LayerScores(attn=attn, mlp=mlp)


class WandaSpScorer:
    """Wanda-sp: ``mean_i |W[i, j]| · ||x_j||`` with ``||x_j||² = mean_samples sum_t x[t, j]²``."""

    needs_activations = True

    def __call__(self, adapter, layer_index: int, stats: ConsumerStats) -> LayerScores:
        return LayerScores(
            attn=_column_mean_abs(adapter.attention_consumer(layer_index).weight) * stats.attn.sample_sq_norm.sqrt(),
            mlp=_column_mean_abs(adapter.mlp_consumer(layer_index).weight) * stats.mlp.sample_sq_norm.sqrt(),
        )


class MagnitudeScorer:
    """magnitude-sp: the L2 norm of the consumer column that reads the channel. Data-free."""

    needs_activations = False

    def __call__(self, adapter, layer_index: int, stats: ConsumerStats | None = None) -> LayerScores:
        return LayerScores(
            attn=_column_norm(adapter.attention_consumer(layer_index).weight),
            mlp=_column_norm(adapter.mlp_consumer(layer_index).weight),
        )


class CfspScorer:
    """CFSP's fine channel score, with a_j = sqrt(mean_samples sum_t x[t, j]^2) of the consumer input.

    For the MLP, with |Wd| [h, I], and |Wu|^T, |Wg|^T [h, I] (row i = hidden unit, column j = channel)::

        terms  = (|Wd| * a^b, |Wu|^T, |Wg|^T)
        score_j = mean_i( sum_terms M[i, j] / norm(M)[i, j] ) * a_j^c

    ``reference`` divides each term by its column sum over i (the released code). Each term then
    contributes exactly 1/h, so the ranking is a_j alone: an activation-norm score. ``intended``
    (the default) divides by the row sum over channels j, in the spirit of relative importance, so
    the weights do change the ranking. For attention channels (o_proj inputs) the same rule applies
    to the single term |Wo| * a^b.
    """

    needs_activations = True

    def __init__(self, score: str = "intended", b: float = 1.0, c: float = 1.0):
        if score not in ("intended", "reference"):
            raise ValueError(f"unknown CFSP score {score!r}")
        self.score, self.b, self.c = score, b, c

    def _relative(self, terms: list[torch.Tensor], activation: torch.Tensor) -> torch.Tensor:
        axis = 0 if self.score == "reference" else 1  # column sums (code) or row sums (intended)
        total = sum(m / m.sum(dim=axis, keepdim=True).clamp_min(1e-30) for m in terms)
        return total.mean(dim=0) * activation.pow(self.c)

    def __call__(self, adapter, layer_index: int, stats: ConsumerStats) -> LayerScores:
        mlp = adapter.mlp_linears(layer_index)
        a_mlp = stats.mlp.sample_sq_norm.sqrt()
        a_attn = stats.attn.sample_sq_norm.sqrt()
        weight = lambda name: mlp[name].weight.detach().to(torch.float64).abs()  # noqa: E731
        down = weight("down_proj") * a_mlp.pow(self.b).to(mlp["down_proj"].weight.device)
        mlp_score = self._relative([down, weight("up_proj").T, weight("gate_proj").T], a_mlp.to(down.device))
        o_proj = adapter.attention_consumer(layer_index).weight.detach().to(torch.float64).abs()
        attn_score = self._relative([o_proj * a_attn.pow(self.b).to(o_proj.device)], a_attn.to(o_proj.device))
        return LayerScores(attn=attn_score, mlp=mlp_score)


Scorer = Callable[..., LayerScores]
