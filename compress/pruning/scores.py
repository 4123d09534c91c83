"""Channel scorers: importance of each input channel of o_proj (per head dim) and down_proj.

A scorer turns one layer's consumer weights and (optionally) its calibration statistics into
``LayerScores``. Scores are float64. o_proj channel ``h·head_dim + k`` belongs to query head h.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from compress.calibration.stats import ChannelStats, ReferenceFluctuation


@dataclass
class ConsumerStats:
    """Statistics of one layer's two consumer inputs (o_proj, down_proj)."""

    attn: ChannelStats
    mlp: ChannelStats
    attn_reference: ReferenceFluctuation | None = None  # parity mode only
    mlp_reference: ReferenceFluctuation | None = None


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


Scorer = Callable[..., LayerScores]
