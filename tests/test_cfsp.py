"""CFSP: block importance, the block_budget allocator, the fine score, and the pass on tiny models."""

from __future__ import annotations

import math

import pytest
import torch
from test_pruning import CALIBRATION, achieved_ratio, run_pass

from compress.calibration.stats import ChannelStats
from compress.errors import CompressError
from compress.models.adapters import get_adapter
from compress.run import apply_plan
from compress.plan import Plan
from compress.pruning.allocators import allocate_block_budget, block_keep_ratios
from compress.pruning.block_importance import measure_block_importance, token_distance
from compress.pruning.scores import CfspScorer, ConsumerStats, LayerScores
from compress.pruning.units import build_layer_units
from conftest import tiny_model


# ----------------------------------------------------------------------------- block importance
def test_token_distances():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    y = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])
    assert token_distance(x, y, "angular").tolist() == pytest.approx([0.0, 0.5, 1.0])
    assert token_distance(x, y, "cosine").tolist() == pytest.approx([0.0, 1.0, 2.0])
    assert token_distance(x, y, "mse").tolist() == pytest.approx([0.5, 5.0, 2.0])


def test_block_importance_is_a_per_token_mean_independent_of_sample_count():
    model = tiny_model()
    adapter = get_adapter(model)
    few = measure_block_importance(adapter, CALIBRATION[:6], batch_size=4)
    doubled = measure_block_importance(adapter, torch.cat([CALIBRATION[:6], CALIBRATION[:6]]), batch_size=4)
    assert len(few) == adapter.num_layers and all(0 < b < 1 for b in few)
    assert few == pytest.approx(doubled, rel=1e-9)


# ----------------------------------------------------------------------------- keep ratios
@pytest.mark.parametrize("mean_keep", [0.3, 0.5, 0.8, 0.95])
@pytest.mark.parametrize("temperature", [0.01, 0.075, 1.0])
def test_keep_ratios_average_to_the_target_and_never_exceed_one(mean_keep, temperature):
    importance = [0.05, 0.30, 0.10, 0.02, 0.20, 0.12]
    weights = [1.0, 1.0, 2.0, 1.0, 1.0, 3.0]
    ratios = block_keep_ratios(importance, weights, mean_keep, temperature)
    weighted = sum(r * w for r, w in zip(ratios, weights)) / sum(weights)
    assert weighted == pytest.approx(mean_keep, rel=1e-9)
    assert all(0 < r < 1 for r in ratios)
    order = sorted(range(6), key=lambda i: importance[i])
    assert [ratios[i] for i in order] == sorted(ratios)  # more important blocks keep more


def test_keep_ratios_cap_follows_the_reference_headroom():
    ratios = block_keep_ratios([0.0, 1.0], [1.0, 1.0], 0.9, temperature=0.01)
    # without the cap the important block would keep 0.9 / 0.5 = 1.8; the cap puts it at 1 - 0.1·(1 - 1/1.05)
    assert max(ratios) == pytest.approx(0.9 + 0.1 / 1.05)
    assert sum(ratios) / 2 == pytest.approx(0.9)


def _units(adapter, prune_attention: bool):
    generator = torch.Generator().manual_seed(0)
    all_units = []
    for i in range(adapter.num_layers):
        scores = LayerScores(attn=torch.rand(64, generator=generator, dtype=torch.float64),
                             mlp=torch.rand(96, generator=generator, dtype=torch.float64))
        units = build_layer_units(adapter, i, scores, gqa="kv_groups", aggregation="sum")
        if not prune_attention:
            units.attn.min_keep = units.attn.size
        all_units.append(units)
    return all_units


@pytest.mark.parametrize("prune_attention", [False, True])
@pytest.mark.parametrize("ratio", [0.2, 0.4])
def test_block_budget_hits_the_parameter_budget(prune_attention, ratio):
    adapter = get_adapter(tiny_model())
    all_units = _units(adapter, prune_attention)
    counts = allocate_block_budget(all_units, ratio, [0.1, 0.3, 0.2, 0.05])
    total = sum(u.total_params for u in all_units)
    kept = sum(a * u.attn.cost + m * u.mlp.cost + u.fixed_params for (a, m), u in zip(counts, all_units))
    assert abs((1 - kept / total) - ratio) < all_units[0].mlp.cost / total + 1e-9
    if not prune_attention:
        assert all(a == u.attn.size for (a, _m), u in zip(counts, all_units))
    mlp = [m for _a, m in counts]
    assert mlp[1] >= mlp[2] >= mlp[0] >= mlp[3]  # follows the block importance
    assert all(m <= 96 for m in mlp)


def test_block_budget_rounds_to_multiples_and_keeps_the_budget():
    adapter = get_adapter(tiny_model())
    all_units = _units(adapter, prune_attention=False)
    counts = allocate_block_budget(all_units, 0.3, [0.1, 0.3, 0.2, 0.05], multiple=16)
    assert all(m % 16 == 0 for _a, m in counts)
    total = sum(u.total_params for u in all_units)
    kept = sum(a * u.attn.cost + m * u.mlp.cost + u.fixed_params for (a, m), u in zip(counts, all_units))
    assert abs((1 - kept / total) - 0.3) <= 16 * all_units[0].mlp.cost / total


def test_block_budget_refuses_a_ratio_the_mlp_cannot_hold():
    adapter = get_adapter(tiny_model())
    with pytest.raises(ValueError, match="removes more than every prunable unit"):
        allocate_block_budget(_units(adapter, prune_attention=False), 0.95, [0.1, 0.3, 0.2, 0.05])


# ----------------------------------------------------------------------------- fine score
def _stats(adapter, layer):
    generator = torch.Generator().manual_seed(2)
    stats = ConsumerStats(attn=ChannelStats(64), mlp=ChannelStats(96))
    stats.attn.update(torch.randn(3, 10, 64, generator=generator))
    stats.mlp.update(torch.randn(3, 10, 96, generator=generator) * torch.linspace(0.1, 3, 96))
    return stats


def test_reference_score_reduces_to_the_activation_norm():
    adapter = get_adapter(tiny_model())
    stats = _stats(adapter, 0)
    scores = CfspScorer("reference")(adapter, 0, stats)
    a = stats.mlp.sample_sq_norm.sqrt()
    torch.testing.assert_close(scores.mlp, 3.0 / adapter.hidden_size * a)


def test_intended_score_lets_the_weights_change_the_ranking():
    adapter = get_adapter(tiny_model())
    stats = _stats(adapter, 0)
    reference = CfspScorer("reference")(adapter, 0, stats).mlp
    intended = CfspScorer("intended")(adapter, 0, stats).mlp
    assert not torch.equal(reference.argsort(), intended.argsort())
    with torch.no_grad():  # silencing a channel's weights lowers its intended score, not the reference one
        adapter.mlp(0).up_proj.weight[5].mul_(1e-3)
        adapter.mlp(0).gate_proj.weight[5].mul_(1e-3)
        adapter.mlp(0).down_proj.weight[:, 5].mul_(1e-3)
    assert CfspScorer("intended")(adapter, 0, stats).mlp[5] < intended[5] / 2
    assert CfspScorer("reference")(adapter, 0, stats).mlp[5] == pytest.approx(float(reference[5]))


# ----------------------------------------------------------------------------- the pass
@pytest.mark.parametrize("attention", [False, True])
def test_cfsp_pass_hits_the_ratio_and_replays(attention, tmp_path):
    model = tiny_model()
    dense = get_adapter(model).decoder_linear_params()
    step = run_pass(model, "cfsp", ratio=0.3, attention=attention)
    widths = get_adapter(model).all_widths()
    assert abs(achieved_ratio(dense, model) - 0.3) < 0.02
    assert len({w.intermediate for w in widths}) > 1  # non-uniform per block
    if not attention:
        assert all(w.heads == 8 and w.kv_heads == 4 for w in widths)
    Plan(model={"num_layers": 4}, steps=[step]).save(tmp_path / "plan.json")
    replayed = tiny_model()
    apply_plan(replayed, Plan.load(tmp_path / "plan.json"))
    for key, value in model.state_dict().items():
        assert torch.equal(value, replayed.state_dict()[key]), key


@pytest.mark.parametrize("name,options", [
    ("flap", {"ratio": 0.3, "allocator": "block_budget"}),
    ("cfsp", {"ratio": 0.3, "allocator": "global", "attention": True}),
    ("wanda_sp", {"ratio": 0.3, "allocator": "block_budget"}),
    ("magnitude_sp", {"ratio": 0.3, "allocator": "block_budget"}),
])
def test_allocators_combine_with_any_scorer(name, options):
    model = tiny_model()
    dense = get_adapter(model).decoder_linear_params()
    run_pass(model, name, **options)
    assert abs(achieved_ratio(dense, model) - 0.3) < 0.03


def test_cfsp_rounding_gives_multiples():
    model = tiny_model()
    run_pass(model, "cfsp", ratio=0.2, round_to=16)
    assert all(w.intermediate % 16 == 0 for w in get_adapter(model).all_widths())


def test_mlp_only_ratio_too_high_is_a_user_error():
    with pytest.raises(CompressError, match="ratio"):
        run_pass(tiny_model(), "cfsp", ratio=0.9)
