"""Least-squares compensation: the closed form, its statistics, and its use by the passes."""

from __future__ import annotations

import pytest
import torch
from test_pruning import CALIBRATION, run_pass

from compress.evaluation.compare import compare_logits
from compress.models.adapters import get_adapter
from compress.run import apply_plan
from compress.plan import Plan
from compress.pruning.compensation import GramStats, add_ridge, least_squares_refit
from compress.pruning.surgeon import REFIT_ARTIFACT
from conftest import tiny_model


def correlated_inputs(tokens: int = 3000, channels: int = 24, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(channels, channels, generator=generator) * 0.4
    return torch.randn(tokens, channels, generator=generator) @ mixing + torch.randn(channels, generator=generator)


def test_gram_statistics_match_direct_computation():
    x = correlated_inputs(200, 6)
    stats = GramStats(6)
    stats.update(x[:77].reshape(7, 11, 6))
    stats.update(x[77:])
    augmented = torch.cat([x, torch.ones(200, 1)], dim=1).double()
    torch.testing.assert_close(stats.matrix, augmented.T @ augmented)
    assert stats.tokens == 200


def test_add_ridge_damps_the_leading_diagonal_by_its_mean():
    matrix = torch.diag(torch.tensor([2.0, 4.0, 6.0, 100.0], dtype=torch.float64))
    ridge = add_ridge(matrix, 0.5, count=3)  # the last entry plays the constant channel: left as it is
    assert ridge == pytest.approx(2.0)
    assert matrix.diagonal().tolist() == [4.0, 6.0, 8.0, 100.0]
    everything = torch.eye(2, dtype=torch.float64) * 3
    assert add_ridge(everything, 0.1) == pytest.approx(0.3)
    assert everything.diagonal().tolist() == pytest.approx([3.3, 3.3])
    dead = torch.zeros(3, 3, dtype=torch.float64)  # no signal: a unit ridge keeps it invertible
    assert add_ridge(dead, 1e-2) == 1.0
    assert torch.linalg.matrix_rank(dead) == 3


def test_refit_is_the_least_squares_solution_with_intercept():
    x = correlated_inputs()
    weight = torch.randn(10, 24, generator=torch.Generator().manual_seed(1))
    stats = GramStats(24)
    stats.update(x)
    keep = list(range(0, 24, 3))
    refit, intercept = least_squares_refit(weight, stats, keep, damp=1e-9)
    design = torch.cat([x[:, keep], torch.ones(len(x), 1)], dim=1).double()
    direct = torch.linalg.lstsq(design, (x @ weight.T).double()).solution
    torch.testing.assert_close(refit, direct[:-1].T, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(intercept, direct[-1], atol=1e-6, rtol=1e-6)


def test_refit_beats_mean_bias_compensation_on_the_calibration_activations():
    x = correlated_inputs()
    weight = torch.randn(10, 24, generator=torch.Generator().manual_seed(1))
    stats = GramStats(24)
    stats.update(x)
    keep = list(range(12))
    refit, intercept = least_squares_refit(weight, stats, keep)
    target = x @ weight.T
    least_squares_error = ((x[:, keep].double() @ refit.T + intercept) - target.double()).pow(2).mean()
    removed = list(range(12, 24))
    bias_output = x[:, keep] @ weight[:, keep].T + weight[:, removed] @ x[:, removed].mean(0)
    assert least_squares_error < 0.5 * (bias_output - target).pow(2).mean()


def test_damping_shrinks_the_refit_towards_zero():
    x = correlated_inputs()
    weight = torch.randn(10, 24, generator=torch.Generator().manual_seed(1))
    stats = GramStats(24)
    stats.update(x)
    light, _ = least_squares_refit(weight, stats, list(range(12)), damp=1e-6)
    heavy, _ = least_squares_refit(weight, stats, list(range(12)), damp=10.0)
    assert heavy.norm() < light.norm()


@pytest.mark.parametrize("sequential", [False, True])
def test_least_squares_pass_fits_the_dense_model_better_than_bias(sequential):
    dense = tiny_model()
    divergence = {}
    for compensation in ("bias", "least_squares"):
        model = tiny_model()
        step = run_pass(model, "flap", ratio=0.4, compensation=compensation, sequential=sequential)
        divergence[compensation] = compare_logits(dense, model, CALIBRATION).mean_kl
        assert (REFIT_ARTIFACT in step.artifacts) == (compensation == "least_squares")
    assert divergence["least_squares"] < divergence["bias"]


@pytest.mark.parametrize("name,options", [
    ("flap", {"ratio": 0.4, "compensation": "least_squares"}),
    ("cfsp", {"ratio": 0.3, "compensation": "least_squares", "attention": True, "sequential": True}),
    ("wanda_sp", {"ratio": 0.3, "compensation": "least_squares"}),
])
def test_refit_plans_replay_bit_for_bit(tmp_path, name, options):
    pruned = tiny_model()
    step = run_pass(pruned, name, **options)
    refit = step.artifacts[REFIT_ARTIFACT]
    adapter = get_adapter(pruned)
    some_layer = next(key for key in refit if key.endswith("down_proj"))
    layer = int(some_layer.split(".")[0])
    assert torch.equal(adapter.mlp_consumer(layer).weight, refit[some_layer])
    plan = Plan(model={"num_layers": 4}, steps=[step])
    plan.save(tmp_path / "plan.json")
    replayed = tiny_model()
    apply_plan(replayed, Plan.load(tmp_path / "plan.json"))
    for key, value in pruned.state_dict().items():
        assert torch.equal(value, replayed.state_dict()[key]), key
