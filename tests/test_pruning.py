"""Structured pruning on tiny random decoders: GQA policies, floors, ratios, compensation, replay."""

from __future__ import annotations

import json

import pytest
import torch

from compress.calibration.runner import LayerRunner, input_hooks
from compress.calibration.stats import ChannelStats
from compress.context import PassContext
from compress.models.adapters import get_adapter
from compress.run import apply_plan
from compress.plan import LayerPlan, Plan, PlanStep
from compress.pruning.allocators import allocate_global, allocate_uniform
from compress.pruning.scores import LayerScores
from compress.pruning.surgeon import apply_layer_plan
from compress.pruning.units import build_layer_units
from compress.registry import get_pass
from compress.errors import PlanError
from conftest import tiny_model

CALIBRATION = torch.randint(0, 128, (12, 16), generator=torch.Generator().manual_seed(1))


def run_pass(model, name: str, **options) -> PlanStep:
    spec = get_pass(name)
    ctx = PassContext(model=model, calibration_loader=lambda: CALIBRATION, batch_size=5, progress=False)
    return spec.cls(spec.options(**options)).run(ctx)


def achieved_ratio(dense_params: int, model) -> float:
    return 1.0 - get_adapter(model).decoder_linear_params() / dense_params


# ----------------------------------------------------------------------------- adapter
def test_adapter_costs_match_real_tensors():
    model = tiny_model()
    adapter = get_adapter(model)
    h, d = 64, 8
    assert adapter.query_head_cost(0) == 2 * d * h
    assert adapter.kv_group_cost(0) == (2 * 2 + 2) * d * h  # 8 heads / 4 KV heads → g = 2
    assert adapter.channel_cost(0) == 3 * h
    w = adapter.widths(0)
    per_layer = w.kv_heads * adapter.kv_group_cost(0) + w.intermediate * adapter.channel_cost(0)
    assert adapter.decoder_linear_params() == 4 * per_layer


def test_adapter_rejects_unknown_architecture():
    from compress.errors import CompressError

    with pytest.raises(CompressError, match="no adapter"):
        get_adapter(torch.nn.Linear(2, 2))


# ----------------------------------------------------------------------------- GQA policies
def test_query_heads_policy_keeps_every_kv_head_and_equal_heads_per_group():
    model = tiny_model()
    run_pass(model, "flap", ratio=0.5, gqa="query_heads")
    adapter = get_adapter(model)
    for i in range(adapter.num_layers):
        w = adapter.widths(i)
        assert w.kv_heads == 4
        assert w.heads % w.kv_heads == 0 and w.heads >= 4
        assert adapter.attention(i).num_key_value_groups == w.heads // w.kv_heads
    assert model(CALIBRATION[:2]).logits.isfinite().all()


def test_kv_groups_policy_removes_whole_groups():
    model = tiny_model()
    step = run_pass(model, "flap", ratio=0.5, gqa="kv_groups")
    adapter = get_adapter(model)
    assert any(adapter.widths(i).kv_heads < 4 for i in range(adapter.num_layers))
    for layer_plan, i in zip(step.layers, range(adapter.num_layers)):
        w = adapter.widths(i)
        assert w.heads == 2 * w.kv_heads  # g stays 2: query heads leave with their KV head
        if layer_plan.keep_kv_heads is not None:
            expected = sorted(2 * kv + j for kv in layer_plan.keep_kv_heads for j in range(2))
            assert layer_plan.keep_heads == expected


def test_slot_units_are_monotone_and_cost_all_query_heads_of_the_slot():
    model = tiny_model()
    adapter = get_adapter(model)
    scores = LayerScores(attn=torch.rand(64, dtype=torch.float64), mlp=torch.rand(96, dtype=torch.float64))
    units = build_layer_units(adapter, 0, scores, gqa="query_heads", aggregation="mean_z")
    assert units.attn.size == 2  # g = 2 slots
    assert torch.all(units.attn.scores[1:] >= units.attn.scores[:-1])
    assert units.attn.cost == 4 * adapter.query_head_cost(0)
    assert units.fixed_params == 4 * adapter.kv_head_cost(0)
    assert sorted(h for m in units.attn.members for h in m) == list(range(8))


# ----------------------------------------------------------------------------- floors and ratio
@pytest.mark.parametrize("ratio", [0.2, 0.5, 0.7])
def test_global_allocation_hits_the_ratio(ratio):
    model = tiny_model()
    dense = get_adapter(model).decoder_linear_params()
    run_pass(model, "flap", ratio=ratio, skip_layers=[])
    # one unit is at most a KV group: (2·2 + 2)·8·64 = 3072 of 122880 parameters
    assert abs(achieved_ratio(dense, model) - ratio) < 0.03


def test_per_layer_minimum_keeps_every_layer_alive():
    model = tiny_model()
    adapter = get_adapter(model)
    # Layer 0's attention and MLP score far below everything else: without floors it would empty.
    all_units = []
    for i in range(adapter.num_layers):
        low = -100.0 if i == 0 else 0.0
        scores = LayerScores(attn=torch.rand(64, dtype=torch.float64) + low, mlp=torch.rand(96, dtype=torch.float64) + low)
        all_units.append(build_layer_units(adapter, i, scores, gqa="kv_groups", aggregation="sum", min_heads=1, min_channels=3))
    counts = allocate_global(all_units, 0.4)
    assert counts[0] == (1, 3)
    no_floor = []
    for units in all_units:
        units.attn.min_keep = units.mlp.min_keep = 0
        no_floor.append(units)
    assert allocate_global(no_floor, 0.4)[0] == (0, 0)


def test_uniform_allocation_gives_every_layer_the_same_widths():
    model = tiny_model()
    dense = get_adapter(model).decoder_linear_params()
    run_pass(model, "magnitude_sp", ratio=0.3)
    widths = get_adapter(model).all_widths()
    assert len(set(widths)) == 1
    assert abs(achieved_ratio(dense, model) - 0.3) < 0.01


def test_round_to_rounds_kept_channels():
    model = tiny_model()
    run_pass(model, "flap", ratio=0.4, round_to=16)
    assert all(w.intermediate % 16 == 0 for w in get_adapter(model).all_widths())


# ----------------------------------------------------------------------------- compensation
def _o_proj_and_down_inputs(model, layer_index: int):
    """Per-token inputs of o_proj and down_proj of one layer on the calibration set."""
    adapter = get_adapter(model)
    captured = {"attn": [], "mlp": []}
    runner = LayerRunner(adapter, CALIBRATION, batch_size=5, progress=False)
    for i in range(layer_index + 1):
        if i == layer_index:
            targets = {"attn": adapter.attention_consumer(i), "mlp": adapter.mlp_consumer(i)}
            with input_hooks(targets, lambda n, x: captured[n].append(x.detach().clone())):
                runner.run_block(i)
        else:
            runner.run_block(i)
    return {k: torch.cat([t.reshape(-1, t.shape[-1]) for t in v]) for k, v in captured.items()}


def test_bias_compensation_preserves_the_mean_output_of_the_pruned_layer():
    model = tiny_model()
    layer = 2
    dense_inputs = _o_proj_and_down_inputs(model, layer)
    adapter = get_adapter(model)
    dense_o = adapter.attention_consumer(layer)
    dense_down = adapter.mlp_consumer(layer)
    dense_mean_o = dense_o(dense_inputs["attn"]).double().mean(0)
    dense_mean_down = dense_down(dense_inputs["mlp"]).double().mean(0)

    step = run_pass(model, "flap", ratio=0.5, compensation="bias")
    plan = step.layers[layer]
    assert plan.o_proj_bias is not None and plan.down_proj_bias is not None
    d = adapter.head_dim
    kept_cols = torch.tensor([h * d + k for h in plan.keep_heads for k in range(d)])
    pruned_o = get_adapter(model).attention_consumer(layer)
    pruned_down = get_adapter(model).mlp_consumer(layer)
    # Same (dense) inputs, restricted to the kept channels: the mean output must not move.
    pruned_mean_o = pruned_o(dense_inputs["attn"][:, kept_cols]).double().mean(0)
    pruned_mean_down = pruned_down(dense_inputs["mlp"][:, torch.tensor(plan.keep_channels)]).double().mean(0)
    torch.testing.assert_close(pruned_mean_o, dense_mean_o, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pruned_mean_down, dense_mean_down, atol=1e-5, rtol=1e-5)


def test_without_compensation_the_mean_output_moves():
    model = tiny_model()
    step = run_pass(model, "flap", ratio=0.5, compensation="none")
    assert all(p.o_proj_bias is None and p.down_proj_bias is None for p in step.layers)
    assert get_adapter(model).mlp_consumer(0).bias is None


# ----------------------------------------------------------------------------- plan replay
@pytest.mark.parametrize(
    "name,options",
    [
        ("flap", {"ratio": 0.5}),
        ("flap", {"ratio": 0.3, "gqa": "kv_groups", "sequential": True}),
        ("flap", {"ratio": 0.3, "structure": "ul-um", "metric": "wifn"}),  # skips 2 of 4 layers: 0.6 each
        ("wanda_sp", {"ratio": 0.4}),
        ("magnitude_sp", {"ratio": 0.4, "gqa": "kv_groups"}),
    ],
)
def test_plan_replay_reproduces_weights_bit_for_bit(tmp_path, name, options):
    pruned = tiny_model()
    step = run_pass(pruned, name, **options)
    plan = Plan(model={"num_layers": 4}, steps=[step])
    plan.save(tmp_path / "plan.json")

    replayed = tiny_model()
    apply_plan(replayed, Plan.load(tmp_path / "plan.json"))
    pruned_state, replayed_state = pruned.state_dict(), replayed.state_dict()
    assert pruned_state.keys() == replayed_state.keys()
    for key in pruned_state:
        assert torch.equal(pruned_state[key], replayed_state[key]), key


def test_two_steps_replay_in_order(tmp_path):
    pruned = tiny_model()
    steps = [run_pass(pruned, "flap", ratio=0.2), run_pass(pruned, "magnitude_sp", ratio=0.2)]
    replayed = tiny_model()
    apply_plan(replayed, Plan(model={"num_layers": 4}, steps=steps))
    for key, value in pruned.state_dict().items():
        assert torch.equal(value, replayed.state_dict()[key]), key


def test_plan_that_does_not_fit_the_model_is_refused(tmp_path):
    model = tiny_model()
    with pytest.raises(PlanError, match="layers"):
        apply_plan(model, Plan(model={"num_layers": 7}, steps=[]))
    bad = PlanStep("flap", {}, [LayerPlan(index=0, keep_heads=[0, 1, 2], keep_kv_heads=None)])
    with pytest.raises(PlanError, match="equal numbers"):
        apply_plan(tiny_model(), Plan(steps=[bad]))
    (tmp_path / "p.json").write_text(json.dumps({"format": "nope"}))
    with pytest.raises(PlanError, match="not a compress plan"):
        Plan.load(tmp_path / "p.json")


def test_surgeon_output_matches_masking():
    """Slicing heads/channels equals zeroing them in the dense model (no compensation)."""
    model = tiny_model()
    masked = tiny_model()
    plan = LayerPlan(index=1, keep_heads=[0, 2, 4, 6], keep_channels=list(range(0, 96, 2)))
    apply_layer_plan(get_adapter(model), plan)
    with torch.no_grad():
        attn = masked.model.layers[1].self_attn
        for h in (1, 3, 5, 7):
            attn.o_proj.weight[:, h * 8 : (h + 1) * 8] = 0
        masked.model.layers[1].mlp.down_proj.weight[:, 1::2] = 0
    torch.testing.assert_close(model(CALIBRATION).logits, masked(CALIBRATION).logits, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- statistics
def test_channel_stats_match_direct_computation():
    x = torch.randn(5, 7, 3)
    stats = ChannelStats(3)
    stats.update(x[:2])
    stats.update(x[2:])
    flat = x.reshape(-1, 3).double()
    torch.testing.assert_close(stats.mean, flat.mean(0))
    torch.testing.assert_close(stats.variance, flat.var(0))
    torch.testing.assert_close(stats.sample_sq_norm, x.double().square().sum(1).mean(0))


def test_layer_runner_reproduces_the_full_forward():
    model = tiny_model()
    adapter = get_adapter(model)
    runner = LayerRunner(adapter, CALIBRATION, batch_size=5, progress=False)
    for i in range(adapter.num_layers):
        runner.run_block(i)
    hidden = torch.cat(runner.hidden)
    expected = model.model(input_ids=CALIBRATION).last_hidden_state
    torch.testing.assert_close(adapter.decoder.norm(hidden), expected, atol=1e-5, rtol=1e-5)


def test_pruning_is_deterministic():
    a, b = tiny_model(), tiny_model()
    step_a = run_pass(a, "flap", ratio=0.5)
    step_b = run_pass(b, "flap", ratio=0.5)
    assert step_a == step_b


def test_parity_mode_runs_and_uses_the_reference_threshold():
    model = tiny_model()
    dense = get_adapter(model).decoder_linear_params()
    step = run_pass(model, "flap", ratio=0.5, parity=True, gqa="kv_groups")
    assert step.options["parity"] is True
    assert abs(achieved_ratio(dense, model) - 0.5) < 0.06


def test_skip_layers_are_left_dense():
    model = tiny_model()
    step = run_pass(model, "flap", ratio=0.5, skip_layers=[0, -1])
    adapter = get_adapter(model)
    for i in (0, 3):
        assert adapter.widths(i).heads == 8
        assert adapter.widths(i).intermediate == 96
        assert step.layers[i].keep_heads is None and step.layers[i].o_proj_bias is None
    assert adapter.widths(1).intermediate < 96


def test_skip_layers_out_of_range_is_a_clear_error():
    from compress.errors import CompressError

    with pytest.raises(CompressError, match="skip_layers"):
        run_pass(tiny_model(), "flap", ratio=0.5, skip_layers=[4])
