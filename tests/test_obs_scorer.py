"""The OBS score (FLAP ``metric: obs``) against brute-force least squares: a unit's score is the
mean squared output error left after the other input channels and a bias are refit optimally."""

from __future__ import annotations

import pytest
import torch

from compress.context import PassContext
from compress.pruning.compensation import GramStats
from compress.pruning.scores import ObsScorer
from compress.registry import get_pass
from tests.conftest import tiny_model

GEN = torch.Generator().manual_seed(0)


def inputs(tokens: int = 400, channels: int = 6) -> torch.Tensor:
    """[tokens, channels] correlated inputs with a non-zero mean."""
    mix = torch.randn(channels, channels, generator=GEN, dtype=torch.float64)
    return torch.randn(tokens, channels, generator=GEN, dtype=torch.float64) @ mix + 0.5


def refit_error(x: torch.Tensor, weight: torch.Tensor, removed: list[int]) -> float:
    """min over W', b of mean_t ‖W x_t − (W' x_t[kept] + b)‖², by lstsq."""
    kept = [j for j in range(x.shape[1]) if j not in removed]
    design = torch.cat([x[:, kept], torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
    target = x @ weight.T
    solution = torch.linalg.lstsq(design, target).solution
    return float((target - design @ solution).square().sum() / x.shape[0])


def gram_of(x: torch.Tensor) -> GramStats:
    gram = GramStats(x.shape[1])
    gram.update(x)
    return gram


def test_channel_and_block_scores_are_the_refit_errors():
    x, weight = inputs(), torch.randn(4, 6, generator=GEN, dtype=torch.float64)
    scorer = ObsScorer(damp=0.0)
    alone = scorer.channel_errors(weight, gram_of(x))
    for j in range(6):
        assert float(alone[j]) == pytest.approx(refit_error(x, weight, [j]), rel=1e-6)
    blocks = scorer.block_errors(weight, gram_of(x), size=2)
    for start in (0, 2, 4):
        expected = refit_error(x, weight, [start, start + 1])
        assert float(blocks[start] + blocks[start + 1]) == pytest.approx(expected, rel=1e-6)
        assert float(blocks[start]) == pytest.approx(float(blocks[start + 1]))


def test_a_channel_the_others_predict_costs_nothing():
    """A copy of another channel (plus a constant) is removable at no error; WIFV would keep it."""
    x = inputs()
    x[:, 5] = 3 * x[:, 1] - 2
    weight = torch.randn(4, 6, generator=GEN, dtype=torch.float64)
    weight[:, 5] *= 10  # the largest weight energy and the largest variance
    scores = ObsScorer(damp=1e-9).channel_errors(weight, gram_of(x))
    assert float(scores[5]) < 1e-4 * float(scores[[0, 2, 3, 4]].min())
    assert int(scores.argmin()) in (1, 5)


def test_damping_raises_every_score_and_a_missing_gram_is_named():
    x, weight = inputs(), torch.randn(4, 6, generator=GEN, dtype=torch.float64)
    plain, damped = (ObsScorer(damp=d).channel_errors(weight, gram_of(x)) for d in (0.0, 0.1))
    assert (damped > plain).all()  # the ridge makes every channel look less predictable
    with pytest.raises(ValueError, match="Gram statistics"):
        ObsScorer().channel_errors(weight, None)


def test_flap_with_the_obs_score_prunes_and_refits_a_model():
    model, dense = tiny_model(), tiny_model()
    calibration = torch.randint(0, 128, (8, 16), generator=GEN)
    spec = get_pass("flap")
    options = spec.options(ratio=0.4, metric="obs", compensation="least_squares", allocator="uniform",
                           gqa="query_heads", sequential=True)
    ctx = PassContext(model=model, tokenizer=None, calibration_loader=lambda: calibration, batch_size=4,
                      progress=False)
    step = spec.cls(options).run(ctx)
    assert step.layers and any(layer.keep_channels is not None for layer in step.layers)
    widths = [layer.mlp.down_proj.in_features for layer in model.model.layers]
    assert widths != [layer.mlp.down_proj.in_features for layer in dense.model.layers]
    with torch.no_grad():
        out = model(input_ids=calibration[:2]).logits
    assert torch.isfinite(out).all()


def test_obs_needs_the_least_squares_refit():
    from pydantic import ValidationError

    options = get_pass("flap").options
    with pytest.raises(ValidationError, match="metric 'obs'.*compensation: least_squares.*'bias'"):
        options(ratio=0.5, metric="obs")
    with pytest.raises(ValidationError, match="parity"):
        options(ratio=0.5, metric="obs", compensation="least_squares", parity=True)
    assert options(ratio=0.5, metric="obs", compensation="least_squares").metric == "obs"
