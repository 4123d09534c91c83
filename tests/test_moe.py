"""MoE expert pruning on tiny random Mixtral / Qwen2-MoE / Qwen3-MoE models: the adapter, the
scores, the allocators, the exactness of the router rewrite, export/reload and plan replay."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from compress.context import PassContext
from compress.errors import CompressError, PlanError
from compress.models.adapters import get_adapter
from compress.models.moe import MoeAdapter
from compress.run import apply_plan
from compress.plan import Plan
from compress.pruning.experts import (
    ExpertStats,
    ExpertSurgeon,
    accumulate_layer,
    allocate_global,
    allocate_uniform,
    collect_expert_stats,
    rank_experts,
)
from compress.registry import get_pass
from conftest import assert_same_safetensors

CALIBRATION = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(1))
BATCH = torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(2))
COMMON = dict(vocab_size=128, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
              max_position_embeddings=256, num_experts_per_tok=2)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_moe(family: str, seed: int = 0, **overrides):
    """A seeded tiny MoE decoder: hidden 32, 8 experts, top-2.

    mixtral: 2 layers.  qwen2_moe: 2 layers with a shared expert (norm_topk_prob via overrides).
    qwen3_moe: 3 layers, layer 1 a dense MLP (mlp_only_layers), norm_topk_prob true.
    """
    torch.manual_seed(seed)
    if family == "mixtral":
        values = dict(intermediate_size=24, num_hidden_layers=2, num_local_experts=8)
        config = MixtralConfig(**{**COMMON, **values, **overrides})
        model = MixtralForCausalLM(config)
    elif family == "qwen2_moe":
        values = dict(intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                      num_hidden_layers=2, num_experts=8, norm_topk_prob=True)
        config = Qwen2MoeConfig(**{**COMMON, **values, **overrides})
        model = Qwen2MoeForCausalLM(config)
    else:
        values = dict(intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3, num_experts=8,
                      mlp_only_layers=[1], norm_topk_prob=True)
        config = Qwen3MoeConfig(**{**COMMON, **values, **overrides})
        model = Qwen3MoeForCausalLM(config)
    model.eval()
    with torch.no_grad():  # wider than the default init, so routing and scores are not near-ties
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    return model


def logits(model, batch=BATCH) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch).logits


def run_pass_on(model, name: str, **options):
    spec = get_pass(name)
    ctx = PassContext(model=model, calibration_loader=lambda: CALIBRATION, batch_size=4, progress=False)
    return spec.cls(spec.options(**options)).run(ctx)


def run_moe_pass(model, **options):
    return run_pass_on(model, "moe_experts", **options)


# ----------------------------------------------------------------------------- the reference
def masked_routing(logits_: torch.Tensor, pruned: list[int], top_k: int, renormalise: bool):
    """The target semantics: the original router (softmax over all E experts) with the pruned
    experts' scores at -inf before top-k; returns (weights [T, k], indices [T, k])."""
    probs = torch.softmax(logits_.float(), dim=-1)
    probs[:, pruned] = float("-inf")
    weights, indices = torch.topk(probs, top_k, dim=-1)
    if renormalise:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, indices


def mask_pruned_experts(model, kept: dict[int, list[int]], top_k: int | None = None) -> list:
    """Forward hooks on the dense model's routers that re-route every token with the pruned
    experts at -inf (and ``top_k`` experts per token when given); returns the handles."""
    adapter = get_adapter(model)
    handles = []
    for layer in adapter.moe_layers():
        pruned = [i for i in range(layer.num_experts) if i not in kept[layer.index]]
        k = top_k or layer.top_k

        if isinstance(layer.router, nn.Linear):
            # 4.x layout: the block routes from the logits it gets; -inf logits give the same routing
            # as -inf scores for a renormalising router (the only kind this layout is tested with)
            def hook(_module, _args, output, _pruned=pruned):
                output = output.clone()
                output[:, _pruned] = float("-inf")
                return output
        else:
            def hook(module, args, output, _pruned=pruned, _k=k, _renorm=layer.rule.renormalise):
                raw = F.linear(args[0].reshape(-1, module.hidden_dim), module.weight)
                weights, indices = masked_routing(raw, _pruned, _k, _renorm)
                return raw, weights.to(output[1].dtype), indices

        handles.append(layer.router.register_forward_hook(hook))
    return handles


def keep_sets(adapter, seed: int = 0, count: int = 5) -> dict[int, list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return {layer.index: sorted(torch.randperm(layer.num_experts, generator=generator)[:count].tolist())
            for layer in adapter.moe_layers()}


# ----------------------------------------------------------------------------- 4.x-style layout
class ListExpert(nn.Module):
    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor):
        super().__init__()
        width = down.shape[1]
        self.gate_proj = nn.Linear(gate_up.shape[1], width, bias=False)
        self.up_proj = nn.Linear(gate_up.shape[1], width, bias=False)
        self.down_proj = nn.Linear(width, down.shape[0], bias=False)
        with torch.no_grad():
            self.gate_proj.weight.copy_(gate_up[:width])
            self.up_proj.weight.copy_(gate_up[width:])
            self.down_proj.weight.copy_(down)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class ListMoeBlock(nn.Module):
    """A transformers-4-style sparse block: Linear router, ModuleList of experts, routing in forward."""

    def __init__(self, fused_block):
        super().__init__()
        router, experts = fused_block.gate, fused_block.experts
        self.top_k, self.num_experts, self.norm_topk_prob = router.top_k, router.num_experts, router.norm_topk_prob
        self.gate = nn.Linear(router.hidden_dim, router.num_experts, bias=False)
        with torch.no_grad():
            self.gate.weight.copy_(router.weight)
        self.experts = nn.ModuleList(ListExpert(experts.gate_up_proj[i], experts.down_proj[i])
                                     for i in range(router.num_experts))

    def forward(self, hidden_states):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        probs = torch.softmax(self.gate(x).float(), dim=-1)
        weights, indices = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        for i, expert in enumerate(self.experts):
            token, slot = torch.where(indices == i)
            if token.numel():
                out.index_put_((token,), expert(x[token]) * weights[token, slot, None].to(x.dtype), accumulate=True)
        return out.reshape(shape)


def tiny_list_layout():
    model = tiny_moe("qwen3_moe")
    for index in (0, 2):
        model.model.layers[index].mlp = ListMoeBlock(model.model.layers[index].mlp)
    return model


# ----------------------------------------------------------------------------- adapter
@pytest.mark.parametrize("family,overrides,moe_layers,shared,count_key", [
    ("mixtral", {}, [0, 1], (), "num_local_experts"),
    ("qwen2_moe", {}, [0, 1], ("shared_expert", "shared_expert_gate"), "num_experts"),
    ("qwen3_moe", {}, [0, 2], (), "num_experts"),
    ("qwen3_moe", {"mlp_only_layers": [], "decoder_sparse_step": 2}, [1], (), "num_experts"),
])
def test_adapter_reads_layers_routers_and_experts(family, overrides, moe_layers, shared, count_key):
    model = tiny_moe(family, **overrides)
    adapter = get_adapter(model)
    assert isinstance(adapter, MoeAdapter) and adapter.family.expert_count_key == count_key
    assert [layer.index for layer in adapter.moe_layers()] == moe_layers
    layer = adapter.moe_layers()[0]
    assert layer.num_experts == 8 and layer.top_k == 2 and layer.shared == shared and layer.rule.renormalise
    assert layer.experts.layout == "fused"
    # the experts module's own forward equals the sum of gate × f_i computed through the adapter
    x = torch.randn(10, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _, weights, indices = layer.routing(layer.router(x))
        expected = layer.experts.module(x, indices, weights)
        manual = torch.zeros_like(x)
        for t in range(10):
            for slot in range(2):
                manual[t] += weights[t, slot] * layer.experts.expert_output(int(indices[t, slot]), x[t:t + 1])[0]
    assert torch.allclose(expected, manual, atol=1e-6)
    widths = adapter.all_widths()
    assert [w.experts for w in widths] == [8 if i in moe_layers else 0 for i in range(len(widths))]
    counts = adapter.param_counts()
    assert counts["routed_experts"] == len(moe_layers) * 8 * layer.experts.params_per_expert()
    assert counts["active_per_token"] == counts["total"] - len(moe_layers) * 6 * layer.experts.params_per_expert()
    assert adapter.summary()["groups"][0]["kind"] == "expert"


def test_list_layout_matches_the_fused_layout_in_outputs_and_statistics():
    fused, listed = tiny_moe("qwen3_moe"), tiny_list_layout()
    assert (logits(fused) - logits(listed)).abs().max() < 1e-5
    layer = get_adapter(listed).moe_layers()[0]
    assert layer.experts.layout == "module_list" and isinstance(layer.router, nn.Linear) and layer.rule.renormalise
    a = collect_expert_stats(get_adapter(fused), CALIBRATION, batch_size=4)
    b = collect_expert_stats(get_adapter(listed), CALIBRATION, batch_size=4)
    for index in a:
        assert torch.equal(a[index].frequency, b[index].frequency)
        assert torch.allclose(a[index].easy_ep, b[index].easy_ep, rtol=1e-4)


def test_mixtral_always_renormalises_and_qwen_follows_norm_topk_prob():
    assert get_adapter(tiny_moe("mixtral")).moe_layers()[0].rule.exact_after_slicing
    assert not get_adapter(tiny_moe("qwen2_moe", norm_topk_prob=False)).moe_layers()[0].rule.exact_after_slicing
    assert not get_adapter(tiny_moe("qwen3_moe", norm_topk_prob=False)).moe_layers()[0].rule.renormalise


@pytest.mark.parametrize("name", ["flap", "magnitude_sp"])
def test_dense_mlp_passes_are_refused_on_moe_models_with_a_clear_error(name):
    with pytest.raises(CompressError, match="mixture-of-experts model.*moe_experts"):
        run_pass_on(tiny_moe("mixtral"), name, ratio=0.3)
    assert not hasattr(get_adapter(tiny_moe("mixtral")), "mlp_linears")


# ----------------------------------------------------------------------------- router rewrite
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_the_reference_masking_reproduces_the_stock_router_when_nothing_is_masked(family):
    model = tiny_moe(family)
    dense = logits(model)
    handles = mask_pruned_experts(model, {layer.index: list(range(8)) for layer in get_adapter(model).moe_layers()})
    try:
        assert torch.equal(logits(model), dense)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("family,top_k", [("mixtral", None), ("qwen2_moe", None), ("qwen3_moe", None),
                                          ("mixtral", 1), ("qwen3_moe", 1), ("list_layout", None)])
def test_pruned_model_equals_the_dense_model_with_pruned_experts_at_minus_infinity(family, top_k):
    model = tiny_list_layout() if family == "list_layout" else tiny_moe(family)
    adapter = get_adapter(model)
    kept = keep_sets(adapter)
    kept[adapter.moe_layers()[-1].index] = kept[adapter.moe_layers()[-1].index][:3]  # counts may differ in memory
    handles = mask_pruned_experts(model, kept, top_k)
    reference = logits(model)
    for h in handles:
        h.remove()
    assert (reference - logits(model)).abs().max() > 1e-3  # the masking matters

    results = ExpertSurgeon(top_k=top_k).apply(adapter, kept)
    assert all(r.exact for r in results)
    assert (logits(model) - reference).abs().max() < 1e-5
    for layer in get_adapter(model).moe_layers():
        assert layer.num_experts == len(kept[layer.index]) == layer.router.weight.shape[0]
        assert layer.top_k == (top_k or 2)


def test_non_renormalising_router_is_reported_inexact_and_kept_weights_grow_by_z_over_z_keep():
    model = tiny_moe("qwen2_moe", norm_topk_prob=False)
    adapter = get_adapter(model)
    layer = adapter.moe_layers()[0]
    kept = keep_sets(adapter)
    pruned = [i for i in range(8) if i not in kept[0]]
    x = torch.randn(20, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        raw = layer.router(x)[0]
        ref_weights, ref_indices = masked_routing(raw, pruned, 2, renormalise=False)
        kept_mass = torch.softmax(raw.float(), dim=-1)[:, kept[0]].sum(-1, keepdim=True)  # Z_keep / Z
    handles = mask_pruned_experts(model, kept)
    reference = logits(model)
    for h in handles:
        h.remove()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step = run_moe_pass(model, keep=5, score="frequency")
    assert not step.details["router_exact"] and "NOT exact" in step.details["router_note"]
    assert any("NOT exact" in str(w.message) for w in caught)
    assert all(0 < r["kept_router_mass"] < 1 and not r["router_exact"] for r in step.details["moe_layers"])

    # the same experts are picked, with weights scaled by Z / Z_keep (checked on the surgeon's own keep set)
    model = tiny_moe("qwen2_moe", norm_topk_prob=False)
    adapter = get_adapter(model)
    results = ExpertSurgeon().apply(adapter, kept)
    assert not any(r.exact for r in results)
    with torch.no_grad():
        _, weights, indices = adapter.moe_layers()[0].router(x)
    original = torch.tensor(kept[0])[indices]
    assert torch.equal(original, ref_indices)
    assert torch.allclose(weights.float(), ref_weights / kept_mass, atol=1e-6)
    assert (logits(model) - reference).abs().max() > 1e-4  # so the model is not the masked one


def test_surgeon_fails_closed_below_top_k_and_only_lowers_top_k():
    adapter = get_adapter(tiny_moe("mixtral"))
    with pytest.raises(CompressError, match="fewer than top_k"):
        ExpertSurgeon().apply(adapter, {0: [3], 1: [0, 1]})
    assert adapter.expert_counts() == {0: 8, 1: 8}  # nothing was cut
    with pytest.raises(CompressError, match="only be lowered"):
        ExpertSurgeon(top_k=3).apply(adapter, {0: [0, 1, 2], 1: [0, 1, 2]})
    with pytest.raises(PlanError, match="sorted unique"):
        ExpertSurgeon().apply(adapter, {0: [2, 1], 1: [0, 1]})
    ExpertSurgeon(top_k=1).apply(adapter, {0: [3], 1: [5]})
    assert adapter.expert_counts() == {0: 1, 1: 1} and adapter.config.num_experts_per_tok == 1
    assert adapter.config.num_local_experts == 1


# ----------------------------------------------------------------------------- scores
def test_scores_match_a_direct_computation_on_one_layer():
    model = tiny_moe("qwen2_moe")
    layer = get_adapter(model).moe_layers()[0]
    g = torch.Generator().manual_seed(5)
    x, h = torch.randn(12, 32, generator=g), torch.randn(12, 32, generator=g)
    experts = layer.experts.module
    stats = ExpertStats(0, 8, 2)
    with torch.no_grad():
        raw, weights, indices = layer.router(x)
        accumulate_layer(stats, layer, h, x, raw, weights, indices)
        x64, h64 = x.double(), h.double()
        gate_up, down = experts.gate_up_proj.double(), experts.down_proj.double()

        def f(i, xt):  # SwiGLU expert from the raw tensors: down · (silu(W_gate x) ⊙ W_up x)
            gate, up = (gate_up[i] @ xt).chunk(2)
            return down[i] @ (F.silu(gate) * up)

        freq, soft, reap_sum, easy = (torch.zeros(8, dtype=torch.float64) for _ in range(4))
        for t in range(12):
            outs = {int(i): f(int(i), x64[t]) for i in indices[t]}
            gates = {int(i): float(w) for i, w in zip(indices[t], weights[t])}
            routed = sum(gates[i] * outs[i] for i in outs)
            c = max(1 - float(F.cosine_similarity(h64[t], h64[t] + routed, dim=0)), 0.0)
            for i in outs:
                freq[i] += 1
                soft[i] += gates[i]
                reap_sum[i] += gates[i] * outs[i].norm()
                easy[i] += gates[i] * outs[i].norm() * c
    assert stats.tokens == 12
    assert torch.equal(stats.frequency, freq)
    assert torch.allclose(stats.soft_frequency, soft, atol=1e-12)
    expected_reap = torch.where(freq > 0, reap_sum / freq.clamp(min=1), torch.zeros_like(freq))
    assert torch.allclose(stats.reap, expected_reap, rtol=1e-5)
    assert torch.allclose(stats.easy_ep, easy, rtol=1e-5, atol=1e-9)
    assert stats.counts.dtype == stats.easy_ep.dtype == torch.float64
    assert stats.kept_mass(list(range(8))) == pytest.approx(1.0)


def test_frequency_equals_a_manual_top_k_count_over_the_calibration_forward():
    model = tiny_moe("qwen3_moe")
    adapter = get_adapter(model)
    counted = {layer.index: torch.zeros(8, dtype=torch.float64) for layer in adapter.moe_layers()}

    def count(_module, _args, output, _i):
        counted[_i] += torch.bincount(output[2].flatten(), minlength=8).double()

    handles = [layer.router.register_forward_hook(lambda m, a, out, _i=layer.index: count(m, a, out, _i))
               for layer in adapter.moe_layers()]
    with torch.no_grad():
        model(input_ids=CALIBRATION)
    for h in handles:
        h.remove()
    stats = collect_expert_stats(adapter, CALIBRATION, batch_size=3)
    assert set(stats) == {0, 2}
    for index, s in stats.items():
        assert torch.equal(s.frequency, counted[index]) and s.tokens == CALIBRATION.numel()
        assert s.frequency.sum() == 2 * CALIBRATION.numel()


def test_never_routed_experts_warn_and_rank_last():
    model = tiny_moe("mixtral")
    handles = mask_pruned_experts(model, {0: [0, 1, 2, 3, 4, 6, 7], 1: list(range(8))})  # the router never picks 5
    try:
        with pytest.warns(UserWarning, match="never routed"):
            stats = collect_expert_stats(get_adapter(model), CALIBRATION, batch_size=4)
    finally:
        for h in handles:
            h.remove()
    assert 5 in stats[0].never_routed()
    for name in ("easy_ep", "reap", "frequency", "soft_frequency"):
        assert rank_experts(stats[0].score(name), stats[0].soft_frequency)[-1] == 5


# ----------------------------------------------------------------------------- allocation
def test_uniform_allocation_keeps_counts_or_fractions_and_fails_closed():
    rankings = {0: [3, 1, 0, 2, 7, 6, 5, 4], 1: [7, 6, 5, 4, 3, 2, 1, 0]}
    assert allocate_uniform(rankings, 3, top_k=2) == {0: [0, 1, 3], 1: [5, 6, 7]}
    assert allocate_uniform(rankings, 0.5, top_k=2) == {0: [0, 1, 2, 3], 1: [4, 5, 6, 7]}
    with pytest.raises(CompressError, match="fewer than top_k"):
        allocate_uniform(rankings, 1, top_k=2)
    with pytest.raises(CompressError, match="only 8"):
        allocate_uniform(rankings, 9, top_k=2)
    assert allocate_uniform(rankings, 1, top_k=1) == {0: [3], 1: [7]}


def test_global_allocation_follows_normalised_scores_with_a_floor_of_top_k_plus_one():
    flat = torch.ones(8, dtype=torch.float64)
    peaked = torch.tensor([8.0, 7, 6, 5, 0.1, 0.1, 0.1, 0.1], dtype=torch.float64)
    scores = {0: flat, 1: peaked}
    rankings = {i: rank_experts(s) for i, s in scores.items()}
    kept = allocate_global(scores, rankings, 4, top_k=2)
    assert sum(len(ids) for ids in kept.values()) == 8
    assert kept[1] == [0, 1, 2, 3]  # its four strong experts beat the flat layer's average ones
    # a layer with near-zero scores still keeps top_k + 1
    scores = {0: peaked, 1: torch.full((8,), 1e-6, dtype=torch.float64) * torch.arange(1, 9)}
    scores[0] = torch.tensor([9.0, 9, 9, 9, 9, 9, 0.1, 0.1], dtype=torch.float64)
    rankings = {i: rank_experts(s) for i, s in scores.items()}
    kept = allocate_global(scores, rankings, 4, top_k=2)
    assert len(kept[1]) == 3 and kept[1] == [5, 6, 7] and len(kept[0]) == 5
    with pytest.raises(CompressError, match="below the per-layer floors"):
        allocate_global(scores, rankings, 2, top_k=2)


# ----------------------------------------------------------------------------- the pass
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe"])
@pytest.mark.parametrize("score", ["easy_ep", "reap", "frequency", "soft_frequency"])
def test_pass_records_kept_ranked_scores_and_tokens(family, score):
    model = tiny_moe(family)
    step = run_moe_pass(model, keep=0.5, score=score)
    details = step.details
    assert details["router_exact"] and details["experts_after"] * 2 == details["experts_before"]
    for record in details["moe_layers"]:
        assert len(record["kept"]) == 4 and record["kept"] == record["kept_original"]
        assert sorted(record["ranked"]) == list(range(8))
        assert sorted(record["ranked"][:4]) == record["kept"]
        assert len(record["scores"]) == len(record["tokens"]) == 8
        assert sum(record["tokens"]) == 2 * details["calibration"]["tokens_per_layer"]
        ranked_scores = [record["scores"][i] for i in record["ranked"]]
        assert ranked_scores == sorted(ranked_scores, reverse=True)
    assert get_adapter(model).expert_counts() == {r["layer"]: 4 for r in details["moe_layers"]}
    json.dumps(details)  # plain JSON


def test_options_are_validated():
    options = get_pass("moe_experts").options
    assert options(keep=6).keep == 6 and options(keep=6.0).keep == 6 and options(keep=0.25).keep == 0.25
    for bad in (2.5, 0, -1):
        with pytest.raises(ValueError):
            options(keep=bad)
    with pytest.raises(ValueError):
        options(keep=4, score="magnitude")
    with pytest.raises(ValueError):
        options(keep=4, top_k=0)
    from compress.errors import RecipeError
    from compress.recipe import parse_recipe

    with pytest.raises(RecipeError, match=r"passes\[0\]\.moe_experts\.keep"):
        parse_recipe({"name": "x", "passes": [{"moe_experts": {"keep": 2.5}}]}, "x.yaml")


def test_a_second_step_reports_original_ids_and_replays(tmp_path):
    model = tiny_moe("mixtral")
    first = run_moe_pass(model, keep=6, score="frequency")
    second = run_moe_pass(model, keep=4, score="reap")
    for a, b in zip(first.details["moe_layers"], second.details["moe_layers"]):
        assert b["kept_original"] == [a["kept_original"][i] for i in b["kept"]]
    plan = Plan(model={"num_layers": 2}, steps=[first, second])
    plan.save(tmp_path / "plan.json")
    replayed = tiny_moe("mixtral")
    apply_plan(replayed, Plan.load(tmp_path / "plan.json"))
    assert torch.equal(logits(replayed), logits(model))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, replayed.state_dict()[name]), name


def test_replay_refuses_a_model_with_other_expert_counts(tmp_path):
    step = run_moe_pass(tiny_moe("mixtral"), keep=4)
    other = tiny_moe("mixtral")
    ExpertSurgeon().apply(get_adapter(other), {0: list(range(6)), 1: list(range(6))})
    with pytest.raises(PlanError, match="made for 8 experts"):
        apply_plan(other, Plan(steps=[step]))


def test_non_uniform_counts_export_with_a_per_layer_config(tmp_path):
    from exporters.moe import export_moe_safetensors as export_safetensors

    model = tiny_moe("mixtral")
    with torch.no_grad():  # make layer 1's scores much more peaked than layer 0's
        model.model.layers[1].mlp.gate.weight[:2] *= 20
    step = run_moe_pass(model, keep=5, allocator="global", score="frequency")
    counts = [len(r["kept"]) for r in step.details["moe_layers"]]
    assert sum(counts) == 10 and counts[1] == 3 < counts[0]  # layer 1 is held at its floor, top_k + 1
    exported = export_safetensors(model, None, tmp_path / "out")  # tests/test_moe_export.py covers the rest
    assert not exported["uniform"] and exported["config_class"] == "PrunedMixtralConfig"


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_export_reloads_with_stock_transformers(family, tmp_path):
    from exporters.moe import export_moe_safetensors as export_safetensors

    model = tiny_moe(family, **({"norm_topk_prob": False} if family == "qwen2_moe" else {}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # qwen2_moe here does not renormalise: reported, tested above
        run_moe_pass(model, keep=5, top_k=1 if family == "qwen3_moe" else None)
    exported = export_safetensors(model, None, tmp_path / "out")
    assert "config.json" in exported["files"] and exported["uniform"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(reloaded) is type(model)
    config = reloaded.config  # Qwen3-MoE stores num_experts as num_local_experts (an attribute alias)
    assert getattr(config, "num_local_experts" if family == "mixtral" else "num_experts") == 5
    assert config.num_experts_per_tok == (1 if family == "qwen3_moe" else 2)
    assert reloaded.model.layers[0].mlp.gate.top_k == config.num_experts_per_tok
    assert torch.equal(logits(reloaded), logits(model))


# ----------------------------------------------------------------------------- pipeline
def tiny_moe_folder(folder, family: str):
    """A tiny MoE with SmolLM2's tokenizer (vocabulary 49152), saved for recipe runs."""
    from transformers import AutoTokenizer

    from compress.models.loading import embedded_model_folder

    tiny_moe(family, vocab_size=49152).save_pretrained(folder)
    AutoTokenizer.from_pretrained(embedded_model_folder(progress=False)).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family,own_source", [("mixtral", False), ("qwen2_moe", True)])
def test_recipe_run_reloads_and_apply_reproduces_the_artifact_bit_for_bit(family, own_source, tmp_path):
    """The pass scores on the recipe's calibration windows, or on its own `source` of demonstrations."""
    from compress.run import apply_plan_file, run_recipe
    from compress.recipe import parse_recipe

    folder = tiny_moe_folder(tmp_path / "tiny-moe", family)
    text = tmp_path / "demo.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
                    "must be in want of a wife. " * 40)
    calibration = {"source": str(text), "samples": 8, "seqlen": 32, "batch_size": 4}
    options = {"keep": 6, "score": "easy_ep"}
    if own_source:
        options.update(source=str(text), samples=6, seqlen=24)
    recipe = parse_recipe({
        "name": f"tiny-{family}-experts",
        "model": str(folder),
        "device": "cpu",
        **({} if own_source else {"calibration": calibration}),
        "passes": [{"moe_experts": options}],
        "export": {"output": str(tmp_path / "a")},
        "evaluate": {"datasets": [str(text)], "seqlen": 32, "max_windows": 2, "batch_size": 2},
        "validate": {"reload_max_abs_diff": 1e-5},
    }, "test.yaml")
    first = run_recipe(recipe, progress=False)
    assert first.passed, first.failures
    assert first.report["evaluation"]["datasets"]["demo"]["pruned_ppl"] > 0
    params = first.report["params"]
    assert params["pruned"]["total"] < params["dense"]["total"]
    assert first.report["layers"][0]["intermediate"] * 8 == first.report["layers"][0]["dense_intermediate"] * 6
    plan = json.loads((tmp_path / "a" / "plan.json").read_text())
    details = plan["steps"][0]["details"]
    assert details["calibration"]["source"] == (str(text) if own_source else "recipe calibration")
    assert details["calibration"]["windows"] == (6 if own_source else 8)
    assert [len(r["kept_original"]) for r in details["moe_layers"]] == [6, 6]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    assert reloaded.model.layers[0].mlp.gate.weight.shape[0] == 6

    replay = apply_plan_file(tmp_path / "a" / "plan.json", str(folder), tmp_path / "b", device="cpu", progress=False,
                             evaluate=False)
    assert replay.passed
    assert_same_safetensors(tmp_path / "a" / "model.safetensors", tmp_path / "b" / "model.safetensors")
