"""ONNX export with KV cache, the ONNX Runtime decoding loop, and the validation gates.

Tiny random decoders (pruned by hand, as in test_export) are exported once per module and run in
ONNX Runtime on the CPU: a prefill with left padding, then 4 tokens fed one by one through the
cache, against the PyTorch model on the same inputs.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import onnx
import pytest
import torch
from test_export import kv_varying_cuts, make_model, non_uniform_cuts, prune
from typer.testing import CliRunner

from compress.cli import app
from compress.errors import CompressError
from compress.onnx_runtime import OrtDecoder, greedy_generate, positions_from_mask, torch_greedy_generate
from compress.validation import Closeness, Gate
from exporters.onnx import DATA_FILE, ONNX_FILE, SPEC_FILE, DecoderIOSpec, OnnxExportOptions, export_onnx

FP32_ATOL = 1e-4
FP32_RTOL = 1e-3
DECODE_STEPS = 4


@pytest.fixture(scope="module")
def kv_varying_llama():
    """Llama with per-layer KV heads [4, 2, 1, 3], query heads and MLP widths, FLAP biases."""
    return prune(make_model("llama"), kv_varying_cuts())


@pytest.fixture(scope="module")
def kv_varying_export(kv_varying_llama, tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx-kv-varying")
    return export_onnx(kv_varying_llama, None, folder)


def padded_batch(generator: torch.Generator, vocab: int = 128):
    """ids [2, 10] whose second row is left-padded by 3, the mask and the positions that go with it."""
    ids = torch.randint(0, vocab, (2, 10), generator=generator)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0
    positions = torch.from_numpy(positions_from_mask(mask.numpy()))
    return ids, mask, positions


def assert_prefill_and_cached_decode_match(model, decoder: OrtDecoder, atol: float, rtol: float) -> None:
    """ORT vs torch: the prefill (padded positions excluded), then DECODE_STEPS cached single-token steps."""
    generator = torch.Generator().manual_seed(0)
    ids, mask, positions = padded_batch(generator)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    logits, past = decoder(ids.numpy(), mask.numpy(), positions.numpy())
    real = mask.bool().numpy()
    np.testing.assert_allclose(logits[real], out.logits.numpy()[real], atol=atol, rtol=rtol)
    cache = out.cache
    for _ in range(DECODE_STEPS):
        token = torch.randint(0, 128, (2, 1), generator=generator)
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
        step_positions = positions[:, -1:] + 1
        positions = torch.cat([positions, step_positions], dim=1)
        with torch.no_grad():
            out = model(input_ids=token, attention_mask=mask, position_ids=step_positions, cache=cache, use_cache=True)
        cache = out.cache
        logits, past = decoder(token.numpy(), mask.numpy(), step_positions.numpy(), past)
        np.testing.assert_allclose(logits, out.logits.numpy(), atol=atol, rtol=rtol)
    # Padded positions are masked for every later query; their cache entries (from fully masked
    # attention rows in layers >= 1) differ between runtimes and are never read.
    real = mask.bool().numpy()
    for layer, (key, value) in enumerate(past):
        for ours, theirs in ((key, cache.layers[layer].keys), (value, cache.layers[layer].values)):
            ours, theirs = ours.transpose(0, 2, 1, 3), theirs.numpy().transpose(0, 2, 1, 3)  # [b, t, heads, d]
            np.testing.assert_allclose(ours[real], theirs[real], atol=atol, rtol=rtol)


# ------------------------------------------------------------------------------------ export
def test_non_uniform_gqa_export_matches_torch_for_prefill_and_cached_decode(kv_varying_llama, kv_varying_export):
    decoder = OrtDecoder(kv_varying_export.folder)
    assert decoder.spec.kv_heads == [4, 2, 1, 3]
    assert_prefill_and_cached_decode_match(kv_varying_llama, decoder, FP32_ATOL, FP32_RTOL)


def test_graph_io_follows_ort_names_with_per_layer_cache_shapes(kv_varying_export):
    folder = kv_varying_export.folder
    assert {ONNX_FILE, DATA_FILE, SPEC_FILE} <= {p.name for p in folder.iterdir()}
    proto = onnx.load(str(folder / ONNX_FILE), load_external_data=False)
    assert {o.domain: o.version for o in proto.opset_import}[""] == 18
    inputs = {i.name: i for i in proto.graph.input}
    outputs = [o.name for o in proto.graph.output]
    assert list(inputs)[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert outputs[:3] == ["logits", "present.0.key", "present.0.value"]
    for layer, heads in enumerate([4, 2, 1, 3]):
        dims = inputs[f"past_key_values.{layer}.key"].type.tensor_type.shape.dim
        assert dims[0].dim_param and dims[2].dim_param  # batch and past length are dynamic
        assert (dims[1].dim_value, dims[3].dim_value) == (heads, 8)
    ids_dims = inputs["input_ids"].type.tensor_type.shape.dim
    assert all(d.dim_param for d in ids_dims)


def test_export_json_sizes_the_cache_without_the_torch_config(kv_varying_export):
    data = json.loads((kv_varying_export.folder / SPEC_FILE).read_text())
    spec = DecoderIOSpec.from_dict(data)
    assert spec.kv_heads == [4, 2, 1, 3] and spec.head_dim == 8 and spec.num_layers == 4
    assert spec.dtype == "float32" and spec.opset == 18
    shapes = {entry["name"]: entry["shape"] for entry in data["inputs"] + data["outputs"]}
    assert shapes["past_key_values.2.key"] == ["batch", 1, "past_seq", 8]
    assert shapes["present.1.value"] == ["batch", 2, "past_seq + seq", 8]
    assert shapes["logits"] == ["batch", "seq", 128]
    assert [e["name"] for e in data["inputs"]] == spec.input_names


def test_the_exported_model_is_not_modified(kv_varying_llama, kv_varying_export, tmp_path):
    assert next(kv_varying_llama.parameters()).dtype == torch.float32
    assert kv_varying_llama.model.layers[2].self_attn.k_proj.out_features == 8
    # A float32 CPU model is traced in place: afterwards it computes exactly what it did before.
    batch = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = kv_varying_llama(input_ids=batch).logits
    kv_varying_llama.config._attn_implementation = "eager"
    kv_varying_llama.train()
    state = {k: v.clone() for k, v in kv_varying_llama.state_dict().items()}
    export_onnx(kv_varying_llama, None, tmp_path / "again")
    assert kv_varying_llama.training and kv_varying_llama.config._attn_implementation == "eager"
    kv_varying_llama.eval()
    kv_varying_llama.config._attn_implementation = "sdpa"
    with torch.no_grad():
        assert torch.equal(kv_varying_llama(input_ids=batch).logits, before)
    assert all(torch.equal(v, state[k]) for k, v in kv_varying_llama.state_dict().items())


@pytest.mark.parametrize("family,cuts", [("qwen3", non_uniform_cuts), ("mistral", kv_varying_cuts)])
def test_other_families_export_with_cache(family, cuts, tmp_path):
    model = prune(make_model(family), cuts())
    exported = export_onnx(model, None, tmp_path, OnnxExportOptions(slim=False))
    assert_prefill_and_cached_decode_match(model, OrtDecoder(exported.folder), FP32_ATOL, FP32_RTOL)


def test_dense_model_with_empty_past_and_single_token_steps(tmp_path):
    model = make_model("llama")
    decoder = OrtDecoder(export_onnx(model, None, tmp_path).folder)
    assert decoder.spec.kv_heads == [4, 4, 4, 4]
    ids = torch.tensor([[5]])
    logits, past = decoder(ids.numpy())  # seq 1 and past 0: sizes the trace specialised away from
    with torch.no_grad():
        np.testing.assert_allclose(logits, model(ids).logits.numpy(), atol=FP32_ATOL, rtol=FP32_RTOL)
    assert past[0][0].shape == (1, 4, 1, 8)


def test_fp16_export_stays_close_to_fp32_torch(kv_varying_llama, tmp_path):
    decoder = OrtDecoder(export_onnx(kv_varying_llama, None, tmp_path, OnnxExportOptions(fp16=True)).folder)
    assert decoder.spec.dtype == "float16"
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    logits, past = decoder(ids.numpy())
    assert logits.dtype == np.float16 and past[0][0].dtype == np.float16
    with torch.no_grad():
        reference = kv_varying_llama(ids).logits.numpy()
    assert np.abs(logits.astype(np.float32) - reference).max() < 0.5


# ------------------------------------------------------------------------------------ generation
def test_greedy_generation_equals_transformers_generate(kv_varying_llama, kv_varying_export):
    decoder = OrtDecoder(kv_varying_export.folder)
    for seed in range(3):
        prompt = torch.randint(0, 128, (7,), generator=torch.Generator().manual_seed(seed)).tolist()
        onnx_tokens = greedy_generate(decoder, prompt, 16, stop_at_eos=False).tokens
        torch_tokens = torch_greedy_generate(kv_varying_llama, prompt, 16, stop_at_eos=False).tokens
        assert onnx_tokens == torch_tokens
        assert len(onnx_tokens) == 16


def test_decoder_folder_without_graph_is_a_user_error(tmp_path):
    with pytest.raises(CompressError, match="model.onnx is missing"):
        OrtDecoder(tmp_path)


# ------------------------------------------------------------------------------------ gates
def test_closeness_tolerance_used_is_the_allclose_criterion():
    reference = np.array([10.0, -2.0, 0.0])
    inside = Closeness.measure(reference, reference + np.array([0.0095, 0.0, 1e-4]), atol=1e-4, rtol=1e-3)
    assert inside.tolerance_used <= 1.0 and inside.max_abs == pytest.approx(0.0095)
    outside = Closeness.measure(reference, reference + np.array([0.0, 0.0, 2e-4]), atol=1e-4, rtol=1e-3)
    assert outside.tolerance_used == pytest.approx(2.0)
    assert not Gate.check("x", outside.tolerance_used, 1.0, "<=").passed


def test_gate_failure_message_names_metric_value_and_threshold():
    gate = Gate.check("onnx_logits_allclose", 3.5, 1.0, "<=", "max |Δ| 0.01")
    assert not gate.passed
    assert gate.failure_message() == "onnx_logits_allclose = 3.5 (must be <= 1.0): max |Δ| 0.01"
    assert Gate.check("mean_kl", 0.1, None, "<=") is None
    assert Gate.check("valid", True, True, "==").passed


# ------------------------------------------------------------------------------------ CLI
def test_generate_command_prints_the_continuation(tmp_path):
    from transformers import AutoTokenizer

    from compress.models.loading import embedded_model_folder

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_folder(progress=False))
    model = make_model("llama", vocab_size=len(tokenizer))
    exported = export_onnx(model, tokenizer, tmp_path, OnnxExportOptions(slim=False))
    result = CliRunner().invoke(app, ["generate", "--onnx", str(exported.folder), "-n", "5", "--ignore-eos", "Once upon"])
    assert result.exit_code == 0, result.output
    prompt = tokenizer("Once upon", add_special_tokens=False)["input_ids"]
    expected = torch_greedy_generate(model, prompt, 5, stop_at_eos=False).tokens
    assert "Once upon" + tokenizer.decode(expected) in result.output
    assert "5 tokens, CPUExecutionProvider" in result.output
    if importlib.util.find_spec("onnxruntime_genai") is not None:
        result = CliRunner().invoke(app, ["generate", "--onnx", str(exported.folder), "-n", "5", "--runtime", "genai",
                                          "--ignore-eos", "Once upon"])
        assert result.exit_code == 0, result.output
        assert "Once upon" + tokenizer.decode(expected) in result.output
        assert "5 tokens, onnxruntime-genai (CPU)" in result.output


def test_validate_command_on_a_missing_target_exits_2(tmp_path):
    result = CliRunner().invoke(app, ["validate", str(tmp_path / "nothing")])
    assert result.exit_code == 2
    assert "no such recipe file or artifact folder" in result.output


# ------------------------------------------------------------------------------------ onnxruntime-genai
def test_genai_config_lets_onnxruntime_genai_run_per_layer_kv_heads(kv_varying_llama, kv_varying_export):
    """The folder as exported (per-layer KV heads [4, 2, 1, 3]) runs in onnxruntime-genai and its greedy
    tokens equal transformers' generate."""
    pytest.importorskip("onnxruntime_genai")
    from compress.genai_runtime import GenaiDecoder

    config = json.loads((kv_varying_export.folder / "genai_config.json").read_text())
    assert config["model"]["decoder"]["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert config["search"]["past_present_share_buffer"] is False
    assert "genai_config.json" in kv_varying_export.files
    decoder = GenaiDecoder(kv_varying_export.folder)
    for seed in range(3):
        prompt = torch.randint(0, 128, (7,), generator=torch.Generator().manual_seed(seed)).tolist()
        genai_tokens = decoder.greedy_generate(prompt, 16, stop_at_eos=False).tokens
        assert genai_tokens == torch_greedy_generate(kv_varying_llama, prompt, 16, stop_at_eos=False).tokens
        assert len(genai_tokens) == 16


def test_genai_on_a_folder_without_its_config_is_a_user_error(kv_varying_export, tmp_path):
    pytest.importorskip("onnxruntime_genai")
    from compress.genai_runtime import GenaiDecoder

    for name in ("model.onnx", "export.json"):
        (tmp_path / name).write_bytes((kv_varying_export.folder / name).read_bytes())
    with pytest.raises(CompressError, match="no genai_config.json"):
        GenaiDecoder(tmp_path)
