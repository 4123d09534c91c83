"""The fused deployment graph (exporters/onnx_fused.py): ONNX Runtime's GroupQueryAttention and
SkipSimplifiedLayerNormalization written from the weights, one node per layer with its own widths.

Tiny random decoders with head_dim 16 (GroupQueryAttention needs a multiple of 16), pruned by hand
as in test_export, against the PyTorch model: every position through the full-logits twin, the
last position through the generation graph, cached decoding, onnxruntime-genai's greedy tokens.
"""

from __future__ import annotations

import collections
import json

import numpy as np
import onnx
import pytest
import torch
from test_export import LayerCut, kv_varying_cuts, make_model, prune

from compress.errors import CompressError
from compress.onnx_runtime import OrtDecoder, greedy_generate, torch_greedy_generate
from compress.validation import check_graph
from exporters.onnx import (
    ONNX_FILE,
    SPEC_FILE,
    OnnxExportOptions,
    export_onnx,
    resolve_graph,
)

ATOL, RTOL = 1e-4, 1e-3
FUSED = OnnxExportOptions(graph="fused")


def fused_model(family: str = "llama", cuts=kv_varying_cuts, **overrides):
    return prune(make_model(family, head_dim=16, **overrides), cuts())


@pytest.fixture(scope="module")
def kv_varying():
    """Llama with per-layer KV heads [4, 2, 1, 3], query heads and MLP widths, FLAP biases; head_dim 16."""
    return fused_model()


@pytest.fixture(scope="module")
def fused_export(kv_varying, tmp_path_factory):
    return export_onnx(kv_varying, None, tmp_path_factory.mktemp("fused"), FUSED)


def assert_matches_torch(model, folder, steps: int = 4) -> None:
    """Every prefill position (full-logits twin), the generation graph's last position, then
    ``steps`` cached single-token steps, against PyTorch on the whole sequence."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (2, 9 + steps), generator=generator)
    with torch.no_grad():
        reference = model(input_ids=ids).logits.numpy()
    full, last = OrtDecoder(folder), OrtDecoder(folder, logits="graph")
    logits, past = full(ids[:, :9].numpy())
    np.testing.assert_allclose(logits, reference[:, :9], atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(last(ids[:, :9].numpy())[0][:, 0], reference[:, 8], atol=ATOL, rtol=RTOL)
    for position in range(9, 9 + steps):
        logits, past = last(ids[:, position:position + 1].numpy(), past=past)
        np.testing.assert_allclose(logits[:, 0], reference[:, position], atol=ATOL, rtol=RTOL)
    assert past[0][0].shape == (2, full.spec.kv_heads[0], 9 + steps, 16)


def test_fused_graph_matches_torch_with_per_layer_widths(kv_varying, fused_export):
    assert fused_export.spec.graph == "fused" and fused_export.spec.logits == "last"
    assert fused_export.spec.kv_heads == [4, 2, 1, 3]
    assert_matches_torch(kv_varying, fused_export.folder)


def test_fused_graph_is_one_attention_and_two_norm_nodes_per_layer(fused_export):
    proto = onnx.load(str(fused_export.folder / ONNX_FILE), load_external_data=False)
    ops = collections.Counter(node.op_type for node in proto.graph.node)
    assert ops["GroupQueryAttention"] == 4 and ops["SkipSimplifiedLayerNormalization"] == 8  # 2 per layer + final; the first is plain
    heads = [{a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
             for node in proto.graph.node if node.op_type == "GroupQueryAttention"]
    assert [(h["num_heads"], h["kv_num_heads"]) for h in heads] == [(8, 4), (4, 2), (1, 1), (3, 3)]
    assert [i.name for i in proto.graph.input][:3] == ["input_ids", "attention_mask", "past_key_values.0.key"]
    logits = proto.graph.output[0].type.tensor_type.shape.dim
    assert logits[1].dim_value == 1  # onnxruntime-genai reads a static 1 as a last-position graph
    assert check_graph(fused_export.folder)["error"] is None
    spec = json.loads((fused_export.folder / SPEC_FILE).read_text())
    assert "position_ids" not in [i["name"] for i in spec["inputs"]] and spec["outputs"][0]["shape"][1] == 1


@pytest.mark.parametrize("family,overrides", [("mistral", {"sliding_window": 5}), ("qwen2", {})])
def test_sliding_windows_and_qkv_biases(family, overrides, tmp_path):
    model = fused_model(family, **overrides)
    if family == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None
    assert_matches_torch(model, export_onnx(model, None, tmp_path, FUSED).folder, steps=6)


def test_a_layer_without_attention_passes_its_empty_cache_through(tmp_path):
    def cuts():
        return [LayerCut((0, 1), (0, 1), 40), LayerCut((), (), 33, flap_biases=True),
                LayerCut((2,), (1,), 5), LayerCut((0, 1, 2), (0,), 0, flap_biases=True)]

    model = fused_model(cuts=cuts)
    exported = export_onnx(model, None, tmp_path, FUSED)
    assert exported.spec.kv_heads == [2, 0, 1, 3]
    assert_matches_torch(model, exported.folder)


def test_generation_in_onnx_runtime_and_genai_equals_transformers(kv_varying, fused_export):
    config = json.loads((fused_export.folder / "genai_config.json").read_text())
    assert config["search"]["past_present_share_buffer"] is True
    assert "position_ids" not in config["model"]["decoder"]["inputs"]
    decoder = OrtDecoder(fused_export.folder, logits="graph")
    prompts = [[3, 17, 42, 9, 77], [100, 5]]
    expected = [torch_greedy_generate(kv_varying, p, 12, stop_at_eos=False).tokens for p in prompts]
    assert [greedy_generate(decoder, p, 12, stop_at_eos=False).tokens for p in prompts] == expected
    from compress.genai_runtime import GenaiDecoder, genai_available

    if genai_available():
        genai = GenaiDecoder(fused_export.folder)  # genai masks the end token when told not to stop: stop at it
        assert [genai.greedy_generate(p, 12).tokens for p in prompts] == \
            [torch_greedy_generate(kv_varying, p, 12).tokens for p in prompts]


def test_quantized_fused_graph_keeps_its_contract(fused_export, tmp_path):
    from exporters.onnx_quant import QuantOptions, quantize_onnx

    quantized = quantize_onnx(fused_export.folder, tmp_path / "int4", QuantOptions(bits=4, method="rtn", block_size=16))
    assert quantized.spec.graph == "fused" and quantized.spec.logits == "last"
    ids = np.arange(2, 12).reshape(1, 10)
    full, last = OrtDecoder(quantized.folder)(ids)[0], OrtDecoder(quantized.folder, logits="graph")(ids)[0]
    assert full.shape == (1, 10, 128) and last.shape == (1, 1, 128)
    np.testing.assert_allclose(full[:, -1], last[:, 0], atol=1e-5)


def test_auto_writes_fused_where_it_can_and_traced_elsewhere():
    assert resolve_graph(fused_model(), OnnxExportOptions(graph="auto")) == "fused"
    assert resolve_graph(fused_model(), OnnxExportOptions(graph="auto", fp16=True)) == "traced"
    assert resolve_graph(make_model("llama"), OnnxExportOptions(graph="auto")) == "traced"  # head_dim 8
    assert resolve_graph(make_model("gemma", head_dim=16), OnnxExportOptions(graph="auto")) == "traced"
    with pytest.raises(CompressError, match="export.onnx.graph: fused: .*'gemma'"):
        resolve_graph(make_model("gemma", head_dim=16), FUSED)


# ------------------------------------------------------------------------------------ GPTQ
def test_gptq_spends_the_rounding_error_where_the_inputs_do_not_look():
    from exporters.onnx_gptq import gptq_quantize

    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(64, 64, generator=generator, dtype=torch.float64)
    x = torch.randn(4000, 64, generator=generator, dtype=torch.float64) @ mixing
    x[:, 5] *= 20  # an outlier channel, as in a gated MLP activation
    weight = torch.randn(64, 48, generator=generator).numpy()
    error = {}
    for name, hessian in (("gptq", x.T @ x), ("nearest", torch.eye(64, dtype=torch.float64))):  # H = I: no error feedback
        for act_order in (False, True):
            quant = gptq_quantize(weight, hessian, block_size=16, act_order=act_order)
            assert quant.q.max() <= 15 and quant.zero_points.max() <= 15
            error[name, act_order] = torch.linalg.norm(x @ torch.from_numpy(quant.dequantized - weight).double()).item()
    assert error["nearest", True] == error["nearest", False]  # without feedback the order changes nothing
    assert max(error["gptq", False], error["gptq", True]) < 0.6 * error["nearest", False]


def test_gptq_codes_run_in_matmul_nbits_as_dequantized():
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from exporters.onnx_gptq import gptq_quantize, pack_matmul_nbits

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((40, 24)).astype(np.float32)  # K = 40: a partial last block
    quant = gptq_quantize(weight, torch.eye(40, dtype=torch.float64) + 0.1, block_size=16, act_order=True)
    packed, scales, zeros = pack_matmul_nbits(quant)
    node = helper.make_node("MatMulNBits", ["x", "B", "s", "z"], ["y"], domain="com.microsoft", K=40, N=24, bits=4,
                            block_size=16)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 40])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 24])],
                              [numpy_helper.from_array(a, n) for a, n in ((packed, "B"), (scales, "s"), (zeros, "z"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    x = rng.standard_normal((3, 40)).astype(np.float32)
    y = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ quant.dequantized, atol=1e-4)


def test_gptq_int4_graph_from_calibration_statistics(kv_varying, fused_export, tmp_path):
    from exporters.onnx_gptq import linear_hessians
    from exporters.onnx_quant import QuantOptions, quantize_onnx

    windows = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(1))
    hessians = linear_hessians(kv_varying, windows)
    assert set(hessians) >= {"layers.0.attn.qkv_proj.weight", "layers.2.mlp.down_proj.weight"}
    assert hessians["layers.1.attn.o_proj.weight"].shape == (4 * 16, 4 * 16)  # layer 1 keeps 4 query heads
    options = QuantOptions(bits=4, method="gptq", block_size=16, head_bits=8, embeddings=False)
    quantized = quantize_onnx(fused_export.folder, tmp_path / "int4", options, hessians)
    proto = onnx.load(str(quantized.folder / ONNX_FILE), load_external_data=False)
    assert sum(node.op_type == "MatMulNBits" for node in proto.graph.node) == 5 * 4 + 1  # linears + the head
    reference, candidate = OrtDecoder(fused_export.folder), OrtDecoder(quantized.folder)
    logits = reference(windows.numpy())[0], candidate(windows.numpy())[0]
    assert np.isfinite(logits[1]).all() and np.corrcoef(logits[0].ravel(), logits[1].ravel())[0, 1] > 0.9
    with pytest.raises(CompressError, match="gptq"):
        quantize_onnx(fused_export.folder, tmp_path / "none", options, None)


def test_spa_refuses_a_fused_graph_by_name(fused_export):
    from typer.testing import CliRunner

    from compress.cli import app
    from compress.models.onnx_graph import find_groups, load_graph

    with pytest.raises(CompressError, match="GroupQueryAttention.*export.onnx.graph: traced"):
        find_groups(load_graph(fused_export.folder / ONNX_FILE))
    result = CliRunner().invoke(app, ["inspect", str(fused_export.folder / ONNX_FILE)], env={"COLUMNS": "250"})
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "fused ops" in " ".join(result.output.split())
