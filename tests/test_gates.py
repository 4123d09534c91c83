"""Every gate can fail: each threshold is crossed on purpose and the run's verdict follows."""

from __future__ import annotations

import math

import pytest
import torch

from compress.gates import Gate, failures_of
from compress.recipe import ValidateSpec
from compress.validation import quality_gates

EVALUATION = {  # the shape of a decoder report's evaluation section (two domains)
    "datasets": {"a": {"ppl_ratio": 1.5}, "b": {"ppl_ratio": 3.0}},
    "geomean_ppl_ratio": math.sqrt(1.5 * 3.0),
    "top1_agreement": 0.6,
    "mean_kl": 0.4,
}


def gates_for(**thresholds) -> dict[str, Gate]:
    return {g.name: g for g in quality_gates(EVALUATION, ValidateSpec(**thresholds))}


@pytest.mark.parametrize("field, name, passing, failing", [
    ("max_ppl_ratio", "ppl_ratio", 3.0, 2.99),  # the worst domain, not the mean
    ("max_geomean_ppl_ratio", "geomean_ppl_ratio", 2.13, 2.12),
    ("min_top1_agreement", "top1_agreement", 0.6, 0.61),
    ("max_mean_kl", "mean_kl", 0.4, 0.39),
])
def test_each_quality_gate_passes_at_its_threshold_and_fails_past_it(field, name, passing, failing):
    assert gates_for(**{field: passing})[name].passed
    gate = gates_for(**{field: failing})[name]
    assert not gate.passed
    assert failures_of([gate]) == [gate.failure_message()] and name in gate.failure_message()


def test_a_gate_without_a_threshold_or_a_value_is_off():
    assert "ppl_ratio" not in gates_for()
    assert Gate.check("mean_kl", None, 1.0, "<=") is None


def test_a_nan_measurement_fails_every_comparison():
    for op in ("<=", ">=", "=="):
        assert not Gate.check("x", float("nan"), 1.0, op).passed


def test_reload_check_sees_a_weight_that_differs_from_the_export(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from compress.kinds.decoder import reload_max_abs_diff

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path)
    windows = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    assert reload_max_abs_diff(model, tmp_path, windows, "cpu") == 0.0
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] += 0.5
    diff = reload_max_abs_diff(model, tmp_path, windows, "cpu")
    gate = Gate.check("reload_max_abs_diff", diff, 1e-4, "<=")
    assert diff > 1e-4 and not gate.passed
