"""FLAP against a naive computation written from the paper: the fluctuation scores from every token's
consumer input collected with plain hooks, and the adaptive global structure (AL-AM) as "keep the
strongest standardised units over all layers until the parameter budget is met"."""

from __future__ import annotations

import pytest
import torch

from compress.calibration.runner import LayerRunner
from compress.context import PassContext
from compress.models.adapters import get_adapter
from compress.pruning.scores import FluctuationScorer
from compress.pruning.structured import PrunerSettings, StructuredPruner
from compress.registry import get_pass
from tests.conftest import tiny_model

CALIBRATION = torch.randint(0, 128, (12, 20), generator=torch.Generator().manual_seed(1))


def consumer_inputs(model) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer, every calibration token's input to o_proj and down_proj: [windows, tokens, channels]."""
    attn, mlp = [], []
    hooks = []
    for layer in model.model.layers:
        attn.append([])
        mlp.append([])
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(
            lambda m, args, store=attn[-1]: store.append(args[0].detach().double())))
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(
            lambda m, args, store=mlp[-1]: store.append(args[0].detach().double())))
    with torch.no_grad():
        model(input_ids=CALIBRATION)
    for hook in hooks:
        hook.remove()
    return [torch.cat(x) for x in attn], [torch.cat(x) for x in mlp]


def naive_score(metric: str, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x: [windows, tokens, channels]; weight: [out, channels] of the consumer."""
    w = weight.detach().double()
    flat = x.reshape(-1, x.shape[-1])
    variance = flat.var(dim=0, unbiased=True)  # the fluctuation of each channel over all tokens
    if metric == "ifv":
        return variance
    if metric == "wifv":
        return variance * (w ** 2).sum(dim=0)
    per_window = (x ** 2).sum(dim=1).mean(dim=0)  # wifn: mean over windows of the token-summed square
    return w.abs().mean(dim=0) * per_window.sqrt()


@pytest.mark.parametrize("metric", ["wifv", "ifv", "wifn"])
def test_fluctuation_scores_equal_the_naive_computation(metric):
    model = tiny_model()
    naive_attn, naive_mlp = consumer_inputs(model)
    adapter = get_adapter(model)
    pruner = StructuredPruner(FluctuationScorer(metric), PrunerSettings(ratio=0.5))
    runner = LayerRunner(adapter, CALIBRATION, batch_size=5, progress=False)  # batches of 5, 5, 2 windows
    runner.capture_inputs()
    for i, layer in enumerate(model.model.layers):
        stats = pruner.observe_block(runner, i, update=True)
        scores = pruner.scorer(adapter, i, stats)
        torch.testing.assert_close(scores.attn.double(), naive_score(metric, naive_attn[i], layer.self_attn.o_proj.weight),
                                   rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(scores.mlp.double(), naive_score(metric, naive_mlp[i], layer.mlp.down_proj.weight),
                                   rtol=1e-5, atol=1e-9)


def zscores(s: torch.Tensor) -> torch.Tensor:
    return (s - s.mean()) / s.std(unbiased=True)


def linear_params(model) -> int:
    return sum(p.numel() for layer in model.model.layers
               for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                         layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj) for p in m.parameters())


@pytest.mark.parametrize("ratio", [0.3, 0.6])
def test_global_structure_keeps_the_strongest_units_of_all_layers_within_the_budget(ratio):
    """No GQA (a unit is one head: head_dim channels, or one MLP channel), no skipped layers: the
    kept units are the pooled top of the per-layer, per-module z-scores (a head scores the mean z
    of its channels; attention scores squared first, FLAP's default), and the kept parameters land
    within one unit of (1 - ratio) of the total."""
    model = tiny_model(num_attention_heads=4, num_key_value_heads=4, head_dim=16)
    naive_attn, naive_mlp = consumer_inputs(model)
    dense = linear_params(model)
    hidden, head_dim = 64, 16
    units = []  # (z, layer, kind, index, cost)
    for i, layer in enumerate(model.model.layers):
        # square_attention (the default, as in the reference code): attention channel scores squared
        attention = naive_score("wifv", naive_attn[i], layer.self_attn.o_proj.weight) ** 2
        za = zscores(attention).reshape(4, head_dim).mean(dim=1)
        zm = zscores(naive_score("wifv", naive_mlp[i], layer.mlp.down_proj.weight))
        units += [(float(z), i, "head", k, 4 * hidden * head_dim) for k, z in enumerate(za)]
        units += [(float(z), i, "channel", k, 3 * hidden) for k, z in enumerate(zm)]

    ctx = PassContext(model=model, calibration_loader=lambda: CALIBRATION, batch_size=5, progress=False)
    spec = get_pass("flap")
    step = spec.cls(spec.options(ratio=ratio, skip_layers=[], compensation="none", gqa="kv_groups")).run(ctx)
    kept = {(i, "head", k) for i in range(4) for k in range(4)} | {(i, "channel", k) for i in range(4) for k in range(96)}
    for lp in step.layers:  # None: that part of the layer is untouched
        if lp.keep_heads is not None:
            kept -= {(lp.index, "head", k) for k in range(4) if k not in lp.keep_heads}
        if lp.keep_channels is not None:
            kept -= {(lp.index, "channel", k) for k in range(96) if k not in lp.keep_channels}
    kept_units = [u for u in units if (u[1], u[2], u[3]) in kept]
    removed_units = [u for u in units if (u[1], u[2], u[3]) not in kept]
    assert removed_units, "something must go"
    # every layer keeps its floor (one head, one channel) first; above the floors, a pooled threshold
    floors = set()
    for i in range(4):
        for kind in ("head", "channel"):
            floors.add(max((u for u in units if u[1] == i and u[2] == kind), key=lambda u: u[0])[1:4])
    above_floor = [u for u in kept_units if u[1:4] not in floors]
    assert min(u[0] for u in above_floor) >= max(u[0] for u in removed_units)
    # the budget, counted on the pruned model's real tensors
    pruned = linear_params(model)
    assert abs(pruned - (1 - ratio) * dense) <= 4 * hidden * head_dim
    assert pruned == sum(u[4] for u in kept_units)
