"""The search allocator and least-squares compensation with held-out damping, on tiny Llamas."""

from __future__ import annotations

import math
import random

import pytest
import torch

from compress.context import PassContext
from compress.evaluation import compare_logits
from compress.models.adapters import get_adapter
from compress.pruning.compensation import GramStats, choose_damp, least_squares_refit, refit_error
from compress.pruning.scores import FluctuationScorer
from compress.pruning.search import KLFitness, MaskedAllocation, propose
from compress.pruning.structured import PrunerSettings, StructuredPruner
from compress.registry import get_pass
from tests.conftest import tiny_model

G = torch.Generator().manual_seed(0)
CALIBRATION = torch.randint(0, 128, (32, 16), generator=G)
HELDOUT = torch.randint(0, 128, (8, 16), generator=G)
TEST = torch.randint(0, 128, (8, 16), generator=G)


def prune(model, **options):
    ctx = PassContext(model=model, calibration_loader=lambda: CALIBRATION, heldout_loader=lambda: HELDOUT,
                      batch_size=8, progress=False)
    spec = get_pass("flap")
    return spec.cls(spec.options(**options)).run(ctx)


def scored_units(model, gqa="kv_groups"):
    """Per layer, units and statistics as the global allocator sees them (no slicing)."""
    from compress.calibration.runner import LayerRunner

    adapter = get_adapter(model)
    pruner = StructuredPruner(FluctuationScorer("wifv"), PrunerSettings(ratio=0.4, gqa=gqa))
    runner = LayerRunner(adapter, CALIBRATION, batch_size=8, progress=False)
    runner.capture_inputs()
    units, stats = [], []
    for i in range(adapter.num_layers):
        s = pruner.observe_block(runner, i, update=True)
        stats.append(s)
        units.append(pruner.layer_units(adapter, i, pruner.scorer(adapter, i, s)))
    return adapter, pruner, units, stats


@pytest.mark.parametrize("gqa", ["kv_groups", "query_heads"])
def test_masks_with_bias_are_the_sliced_model_with_flap_compensation(gqa):
    """The search's masked model equals the model the surgeon slices, for the same counts."""
    model = tiny_model()
    adapter, pruner, units, stats = scored_units(model, gqa)
    counts = [(lu.attn.size - 1, lu.mlp.size // 2) for lu in units]
    masked = MaskedAllocation(adapter, units, stats, compensate=True)
    masked.set(counts)
    with torch.no_grad():
        via_masks = model(input_ids=TEST).logits
    masked.remove()
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=TEST).logits, via_masks)  # the hooks are gone
    plans = [pruner.layer_plan(adapter, u, a, m, s) for u, (a, m), s in zip(units, counts, stats)]
    for plan in plans:
        pruner._apply(adapter, plan)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=TEST).logits, via_masks, atol=2e-5, rtol=1e-5)


def test_fitness_reuses_cached_layers_exactly():
    model = tiny_model()
    adapter, _, units, stats = scored_units(model)
    masked = MaskedAllocation(adapter, units, stats, compensate=True)
    fitness = KLFitness(adapter, masked, HELDOUT, batch_size=4)
    dense_counts = [(lu.attn.size, lu.mlp.size) for lu in units]
    kl, states = fitness.evaluate(dense_counts)
    assert kl == pytest.approx(0.0, abs=5e-5)  # the dense log-probs are kept in float16
    fitness.accept(0, states)
    changed = [list(c) for c in dense_counts]
    changed[2][1] = 40
    full, _ = fitness.evaluate([tuple(c) for c in changed], 0)
    partial, _ = fitness.evaluate([tuple(c) for c in changed], 2)  # layers 0-1 from the cache
    assert partial == pytest.approx(full, rel=1e-6) and full > 0
    masked.remove()


def test_moves_keep_the_budget_and_the_bounds():
    model = tiny_model(num_hidden_layers=6)
    _, _, units, _ = scored_units(model)
    counts = [[lu.attn.size - 2, lu.mlp.size // 2] for lu in units]

    def kept(c):
        return sum(a * lu.attn.cost + m * lu.mlp.cost for (a, m), lu in zip(c, units))

    rng = random.Random(0)
    moves = 0
    for _ in range(200):
        move = propose(units, counts, rng, 1 / 8)
        if move is None:
            continue
        new, first = move
        moves += 1
        changed = [i for i in range(len(units)) if new[i] != counts[i]]
        assert first == min(changed) and len(changed) <= 2
        assert abs(kept(new) - kept(counts)) <= max(lu.mlp.cost for lu in units) / 2 + 1
        for (a, m), lu in zip(new, units):
            assert lu.attn.min_keep <= a <= lu.attn.size and lu.mlp.min_keep <= m <= lu.mlp.size
        counts = new
    assert moves > 50


def test_search_lowers_the_heldout_kl_and_keeps_the_ratio():
    searched, base = tiny_model(num_hidden_layers=6), tiny_model(num_hidden_layers=6)
    step = prune(searched, ratio=0.4, allocator="search", search_evaluations=40)
    prune(base, ratio=0.4)
    assert step.details["search_final_kl"] <= step.details["search_start_kl"]
    assert step.details["search_evaluations"] >= 20
    dense = get_adapter(tiny_model(num_hidden_layers=6)).decoder_linear_params()
    ratio = 1 - get_adapter(searched).decoder_linear_params() / dense
    assert ratio == pytest.approx(0.4, abs=0.01)
    if step.details["search_accepted"]:  # the searched widths differ from the global allocation
        assert [w.intermediate for w in get_adapter(searched).all_widths()] != \
            [w.intermediate for w in get_adapter(base).all_widths()]


# ----------------------------------------------------------------------------------- least squares
def _gram(x):
    g = GramStats(x.shape[1])
    g.update(x)
    return g


def test_refit_error_is_the_direct_reconstruction_error_and_the_dense_prior_limits():
    torch.manual_seed(0)
    weight = torch.randn(5, 12)
    x, xh = torch.randn(200, 12) @ torch.randn(12, 12) + 0.3, torch.randn(80, 12) @ torch.randn(12, 12) + 0.3
    g, h = _gram(x), _gram(xh)
    keep = [0, 2, 3, 5, 7, 8, 11]
    for prior in ("zero", "dense"):
        for damp in (0.0, 1e-2, 1.0):
            refit, intercept = least_squares_refit(weight, g, keep, damp, prior)
            direct = ((xh[:, keep].double() @ refit.T + intercept) - xh.double() @ weight.double().T).square().sum()
            assert refit_error(weight, h, keep, refit, intercept) == pytest.approx(float(direct), rel=1e-8)
    removed = [i for i in range(12) if i not in keep]
    refit, intercept = least_squares_refit(weight, g, keep, math.inf, "dense")  # FLAP's bias compensation
    torch.testing.assert_close(refit, weight.double()[:, keep])
    torch.testing.assert_close(intercept, weight.double()[:, removed] @ x.double()[:, removed].mean(0))
    big, _ = least_squares_refit(weight, g, keep, 1e9, "dense")
    torch.testing.assert_close(big, weight.double()[:, keep], atol=1e-5, rtol=0)
    damp, _, _, errors = choose_damp(weight, g, h, keep)
    assert errors[str(damp)] == min(errors.values()) and len(errors) == 9


def test_auto_damp_is_recorded_and_the_plan_replays(tmp_path):
    from compress.run import apply_plan
    from compress.plan import Plan

    model = tiny_model()
    step = prune(model, ratio=0.4, compensation="least_squares", ls_damp="auto", ls_prior="dense")
    chosen = step.details["ls_damp_chosen"]
    assert set(chosen) == {f"{i}.{c}" for i in (1, 2) for c in ("o_proj", "down_proj")}
    plan = Plan(model={"num_layers": 4}, steps=[step])
    plan.save(tmp_path / "plan.json")
    replayed = tiny_model()
    apply_plan(replayed, Plan.load(tmp_path / "plan.json"))
    with torch.no_grad():
        assert torch.equal(model(input_ids=TEST).logits, replayed(input_ids=TEST).logits)
    assert compare_logits(tiny_model(), model, TEST).mean_kl > 0


@pytest.mark.parametrize("allocator", ["search", "global", "uniform"])
def test_sequential_least_squares_with_auto_damp_under_every_allocator(allocator):
    """A sequential global run refits in its second sweep (the first keeps no Gram matrices and runs no
    held-out windows); the layer-wise one refits as it goes: both choose a damp for every consumer."""
    model = tiny_model(num_hidden_layers=6)
    step = prune(model, ratio=0.4, allocator=allocator, search_evaluations=10, sequential=True,
                 compensation="least_squares", ls_damp="auto", ls_prior="dense")
    pruned_layers = {p.index for p in step.layers if p.keep_channels is not None or p.keep_heads is not None}
    assert pruned_layers and {int(k.split(".")[0]) for k in step.details["ls_damp_chosen"]} == pruned_layers


# ----------------------------------------------------------------------------- drift correction
def test_drift_delta_is_the_ridge_least_squares_fit_of_the_error():
    from compress.pruning.compensation import DriftStats, choose_drift_damp, drift_delta, drift_error

    g = torch.Generator().manual_seed(3)
    x = torch.randn(400, 6, generator=g) @ torch.randn(6, 6, generator=g) + 0.5
    error = x @ torch.randn(6, 4, generator=g) + 0.1 * torch.randn(400, 4, generator=g) + 2.0
    stats = DriftStats(6, 4)
    stats.update(x[:150].reshape(10, 15, 6), error[:150].reshape(10, 15, 4))
    stats.update(x[150:], error[150:])
    design = torch.cat([x, torch.ones(400, 1)], dim=1).double()
    direct = torch.linalg.lstsq(design, error.double()).solution
    torch.testing.assert_close(drift_delta(stats, 0.0), direct, atol=1e-6, rtol=1e-6)
    delta = drift_delta(stats, 0.1)
    residual = (error.double() - design @ delta).square().sum()
    assert math.isclose(drift_error(stats, delta), float(residual), rel_tol=1e-8)
    assert drift_error(stats, drift_delta(stats, math.inf)) == pytest.approx(float(error.double().square().sum()))
    damp, best, errors = choose_drift_damp(stats, stats)
    assert errors[str(damp)] == min(errors.values()) and drift_error(stats, best) < stats.error_energy


def test_dense_output_target_follows_the_dense_model_and_replays(tmp_path):
    """ls_target dense_output: every sliced down_proj gets a drift damp chosen on held-out windows,
    the pruned model is closer to the dense one on its calibration text than with the consumer
    target, and the plan (refit weights and bias) replays bit for bit."""
    from compress.plan import Plan
    from compress.run import apply_plan

    options = dict(ratio=0.5, allocator="uniform", sequential=True, compensation="least_squares", ls_damp="auto",
                   ls_prior="dense", skip_layers=[])
    models, steps = {}, {}
    for target in ("consumer", "dense_output"):
        models[target] = tiny_model(num_hidden_layers=6)
        steps[target] = prune(models[target], ls_target=target, **options)
    chosen = steps["dense_output"].details["ls_damp_chosen"]
    assert {k for k in chosen if k.endswith(".drift")} == {f"{i}.drift" for i in range(6)}
    assert not any(k.endswith(".drift") for k in steps["consumer"].details["ls_damp_chosen"])
    kl = {t: compare_logits(tiny_model(num_hidden_layers=6), m, CALIBRATION).mean_kl for t, m in models.items()}
    assert kl["dense_output"] < kl["consumer"]
    plan = Plan(model={"num_layers": 6}, steps=[steps["dense_output"]])
    plan.save(tmp_path / "plan.json")
    replayed = tiny_model(num_hidden_layers=6)
    apply_plan(replayed, Plan.load(tmp_path / "plan.json"))
    for key, value in models["dense_output"].state_dict().items():
        assert torch.equal(value, replayed.state_dict()[key]), key


@pytest.mark.parametrize("options,field", [
    ({"sequential": True, "compensation": "bias"}, "least_squares"),
    ({"sequential": False, "compensation": "least_squares"}, "sequential"),
])
def test_dense_output_target_needs_sequential_least_squares(options, field):
    with pytest.raises(ValueError, match=field):
        get_pass("flap").options(ratio=0.5, ls_target="dense_output", **options)
