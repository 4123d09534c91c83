"""Every decoder family of the adapter table on tiny random models: exact surgery, the structured
passes, safetensors that reload, ONNX with a KV cache, and the GQA edge case of a single KV head.

Families: Llama, Mistral, Qwen2 (q/k/v biases), Qwen3 (per-head q/k norms), Gemma, Gemma 2
(soft-capping, sliding window), Gemma 3 (per-head q/k norms, sliding-window layers), OLMo-2 (q/k
norms over the whole projection), Granite (multipliers) and Phi-3 (fused projections, unfused at
load into the Mistral layout).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_FAMILIES, tiny_model
from transformers import AutoModelForCausalLM

import compress  # noqa: F401  (registers pruned_llama with the Auto classes)
from compress.calibration.sources import prompt_ids, random_windows, sequential_windows, window_bos
from compress.context import PassContext
from compress.errors import ModelSourceError
from compress.models.adapters import get_adapter
from compress.models.phi3 import unfuse_phi3
from compress.onnx_runtime import OrtDecoder
from compress.plan import LayerPlan
from compress.pruning.surgeon import apply_layer_plan
from compress.registry import get_pass
from exporters.onnx import OnnxExportOptions, export_onnx
from exporters.safetensors import export_safetensors

FAMILIES = sorted(TINY_FAMILIES)
NEW_FAMILIES = ["gemma", "gemma2", "gemma3_text", "olmo2", "granite", "phi3"]
BATCH = torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(0))
CALIBRATION = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def family_model(family: str, **overrides):
    """The tiny model of ``family`` as compress holds it (Phi-3 unfused), with norms moved off 1."""
    model = tiny_model(family, **overrides)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 1:
                parameter.uniform_(0.5, 1.5)
    return unfuse_phi3(model) if family == "phi3" else model


def logits(model, ids=BATCH) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def run_pass(model, name: str, **options):
    spec = get_pass(name)
    ctx = PassContext(model=model, calibration_loader=lambda: CALIBRATION, batch_size=4, progress=False)
    return spec.cls(spec.options(**options)).run(ctx)


# ----------------------------------------------------------------------------- exact surgery
@pytest.mark.parametrize("family", FAMILIES)
def test_keeping_every_unit_leaves_the_logits_identical(family):
    model = family_model(family)
    before = logits(model)
    adapter = get_adapter(model)
    for i in range(adapter.num_layers):
        w = adapter.widths(i)
        apply_layer_plan(adapter, LayerPlan(index=i, keep_heads=list(range(w.heads)),
                                            keep_kv_heads=list(range(w.kv_heads)),
                                            keep_channels=list(range(w.intermediate))))
    assert torch.equal(logits(model), before)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "olmo2"])
def test_pruning_equals_masking(family):
    """Slicing query heads and MLP channels gives the dense model with those inputs of o_proj and
    down_proj zeroed (OLMo-2 is left out: its q/k norm spans every head, so no mask equals a cut)."""
    model, masked = family_model(family), family_model(family)
    apply_layer_plan(get_adapter(model), LayerPlan(index=1, keep_heads=[0, 2, 4, 6], keep_channels=list(range(0, 96, 2))))
    with torch.no_grad():
        attention, mlp = masked.model.layers[1].self_attn, masked.model.layers[1].mlp
        for head in (1, 3, 5, 7):
            attention.o_proj.weight[:, head * 8:(head + 1) * 8] = 0
        mlp.down_proj.weight[:, 1::2] = 0
    torch.testing.assert_close(logits(model), logits(masked), atol=1e-5, rtol=1e-5)


def test_olmo2_norms_over_the_whole_projection_lose_the_removed_heads_rows():
    model = family_model("olmo2")
    attention = model.model.layers[2].self_attn
    q_norm, k_norm = attention.q_norm.weight.detach().clone(), attention.k_norm.weight.detach().clone()
    apply_layer_plan(get_adapter(model), LayerPlan(index=2, keep_heads=[0, 1, 4, 5], keep_kv_heads=[0, 2]))
    rows = lambda heads: [h * 8 + j for h in heads for j in range(8)]  # noqa: E731
    assert torch.equal(attention.q_norm.weight, q_norm[rows([0, 1, 4, 5])])
    assert torch.equal(attention.k_norm.weight, k_norm[rows([0, 2])])
    assert torch.isfinite(logits(model)).all()


def test_per_head_norms_stay_whole():
    for family in ("qwen3", "gemma3_text"):
        model = family_model(family)
        apply_layer_plan(get_adapter(model), LayerPlan(index=0, keep_heads=[0, 1], keep_kv_heads=[0]))
        assert model.model.layers[0].self_attn.q_norm.weight.shape == (8,)


# ----------------------------------------------------------------------------- Phi-3
def test_phi3_unfused_is_the_same_network():
    phi3 = tiny_model("phi3")
    mistral = unfuse_phi3(tiny_model("phi3"))
    assert type(mistral).__name__ == "MistralForCausalLM"
    assert torch.equal(logits(mistral), logits(phi3))


def test_phi3_with_a_partial_rotary_embedding_is_refused_by_name():
    with pytest.raises(ModelSourceError, match="phi3.*partial_rotary_factor"):
        unfuse_phi3(tiny_model("phi3", partial_rotary_factor=0.5))


# ----------------------------------------------------------------------------- passes and export
@pytest.mark.parametrize("family", NEW_FAMILIES)
@pytest.mark.parametrize("method,options", [("flap", {}), ("flap", {"compensation": "least_squares"}),
                                            ("wanda_sp", {}), ("magnitude_sp", {}), ("cfsp", {})])
def test_structured_passes_shrink_and_the_export_reloads(family, method, options, tmp_path):
    model = family_model(family)
    dense = get_adapter(model).decoder_linear_params()
    run_pass(model, method, ratio=0.4, **options)
    assert get_adapter(model).decoder_linear_params() < 0.8 * dense
    export_safetensors(model, None, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(reloaded), logits(model), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["gemma3_text", "olmo2", "granite"])
def test_uniform_pruning_exports_a_stock_config(family, tmp_path):
    model = family_model(family)
    adapter = get_adapter(model)
    for i in range(adapter.num_layers):
        apply_layer_plan(adapter, LayerPlan(index=i, keep_heads=[0, 1, 2, 3], keep_kv_heads=[0, 1],
                                            keep_channels=list(range(48))))
    export_safetensors(model, None, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.model_type == family
    torch.testing.assert_close(logits(reloaded), logits(model), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text", "olmo2", "granite", "phi3"])
def test_pruned_families_export_to_onnx_with_a_cache(family, tmp_path):
    model = family_model(family)
    run_pass(model, "flap", ratio=0.4)
    decoder = OrtDecoder(export_onnx(model, None, tmp_path, OnnxExportOptions(slim=False)).folder)
    ids = BATCH[:2, :10]
    ort_logits, past = decoder(ids.numpy())
    with torch.no_grad():
        out = model(ids, use_cache=True)
    np.testing.assert_allclose(ort_logits, out.logits.numpy(), atol=1e-4, rtol=1e-3)
    step = BATCH[:2, 10:11]
    mask = np.ones((2, 11), dtype=np.int64)
    positions = np.full((2, 1), 10, dtype=np.int64)
    ort_step, _ = decoder(step.numpy(), mask, positions, past)
    with torch.no_grad():
        full = model(BATCH[:2, :11]).logits[:, -1:]
    np.testing.assert_allclose(ort_step, full.numpy(), atol=1e-4, rtol=1e-3)


# ----------------------------------------------------------------------------- GQA edge cases
def test_a_single_kv_head_falls_back_to_query_heads_and_never_loses_it():
    """Gemma-3-270M's shape: 4 query heads over 1 KV head. FLAP's default unit (kv_groups) cannot
    remove the only KV group, so its query heads are pruned instead, and every layer keeps its KV head."""
    model = family_model("gemma3_text", num_attention_heads=4, num_key_value_heads=1, head_dim=16)
    run_pass(model, "flap", ratio=0.5, skip_layers=[])
    widths = get_adapter(model).all_widths()
    assert all(w.kv_heads == 1 for w in widths)
    assert any(w.heads < 4 for w in widths)
    assert torch.isfinite(logits(model)).all()


# ----------------------------------------------------------------------------- BOS windows
class _Tokenizer:
    def __init__(self, adds_bos: bool):
        self.bos_token_id, self.adds_bos = 2, adds_bos

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ([2] if self.adds_bos and add_special_tokens else []) + [7]}


def test_windows_start_with_bos_when_the_tokenizer_adds_it():
    ids = torch.arange(10, 200)
    assert window_bos(_Tokenizer(adds_bos=False)) is None
    bos = window_bos(_Tokenizer(adds_bos=True))
    assert bos == 2
    windows = sequential_windows(ids, 16, 4, bos=bos)
    assert windows.shape == (4, 16) and (windows[:, 0] == 2).all()
    assert torch.equal(windows[:, 1:].reshape(-1), ids[:60])  # every text token once, in order
    drawn = random_windows(ids, 5, 16, seed=0, bos=bos)
    assert drawn.shape == (5, 16) and (drawn[:, 0] == 2).all() and (drawn[:, 1:] >= 10).all()
    assert torch.equal(random_windows(ids, 5, 16, seed=0), random_windows(ids, 5, 16, seed=0, bos=None))
    assert prompt_ids(_Tokenizer(adds_bos=True), "x") == [2, 7]  # generation prompts too
    assert prompt_ids(_Tokenizer(adds_bos=False), "x") == [7]


# ----------------------------------------------------------------------------- the layer runner
@pytest.mark.parametrize("family", ["gemma2", "gemma3_text", "granite", "qwen3"])
def test_the_layer_runner_reproduces_the_full_forward(family):
    """Block by block, with each block's own keyword arguments (Gemma's sliding and global layers
    get different masks and rotary tables), the runner gives the decoder's own hidden states."""
    from compress.calibration.runner import LayerRunner

    model = family_model(family, sliding_window=4) if family.startswith("gemma") else family_model(family)
    adapter = get_adapter(model)
    runner = LayerRunner(adapter, CALIBRATION, batch_size=3, progress=False)
    for i in range(adapter.num_layers):
        runner.run_block(i)
    with torch.no_grad():
        expected = model.model(input_ids=CALIBRATION).last_hidden_state
    torch.testing.assert_close(adapter.decoder.norm(torch.cat(runner.hidden)), expected, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- bad input
def _recipe(tmp_path, model_folder, **export) -> str:
    import yaml

    data = {"name": "tiny", "model": str(model_folder), "device": "cpu",
            "calibration": {"source": "austen", "samples": 4, "seqlen": 16},
            "passes": [{"flap": {"ratio": 0.5}}], "export": {"output": str(tmp_path / "out"), **export},
            "evaluate": False}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return str(path)


def test_an_architecture_without_an_adapter_is_refused_before_loading(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    from typer.testing import CliRunner

    from compress.cli import app

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    for arguments in (["run", _recipe(tmp_path, tmp_path / "gpt2"), "--dry-run"], ["inspect", str(tmp_path / "gpt2")]):
        result = CliRunner().invoke(app, arguments, env={"COLUMNS": "250"})
        text = " ".join(result.output.split())
        assert result.exit_code == 2, result.output
        assert "'gpt2'" in text and "gemma3_text" in text and "Traceback" not in text
    assert not (tmp_path / "out").exists()


def test_gguf_of_a_family_llama_cpp_graphs_cannot_hold_is_refused_at_preflight(tmp_path):
    from typer.testing import CliRunner

    from compress.cli import app

    family_model("gemma3_text").save_pretrained(tmp_path / "gemma")
    result = CliRunner().invoke(app, ["run", _recipe(tmp_path, tmp_path / "gemma", formats=["safetensors", "gguf"]),
                                      "--dry-run"], env={"COLUMNS": "250"})
    text = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "formats" in text
    assert "'gemma3_text'" in text and "remove gguf" in text


# ----------------------------------------------------------------------------- LoRA passes
class _ByteTokenizer:
    """One id per UTF-8 byte, modulo 128 (the tiny models' vocabulary)."""

    def __call__(self, text, **kwargs):
        return {"input_ids": [b % 128 for b in text.encode("utf-8")]}


@pytest.mark.parametrize("family", ["gemma3_text", "olmo2", "granite", "phi3"])
def test_loraprune_and_distillation_recovery_run_on_each_family(family, tmp_path):
    """LoRAPrune shrinks the model; distillation (KL to the dense model) then lowers the KL on text
    it trained on; both exports reload with the in-memory logits."""
    from compress.evaluation.compare import compare_logits

    text = tmp_path / "train.txt"
    words = ["the", "pruned", "model", "learns", "again", "from", "a", "little", "text"]
    picks = torch.randint(0, len(words), (1200,), generator=torch.Generator().manual_seed(0)).tolist()
    text.write_text(" ".join(words[i] for i in picks), encoding="utf-8")
    dense = get_adapter(family_model(family)).decoder_linear_params()
    model = family_model(family)
    ctx = PassContext(model=model, tokenizer=_ByteTokenizer(), calibration_loader=lambda: CALIBRATION, batch_size=4,
                      progress=False, dense_loader=lambda: family_model(family))
    spec = get_pass("loraprune")
    spec.cls(spec.options(ratio=0.4, steps=8, prune_every=2, batch_size=2, seqlen=16, lr=1e-2, rank=4,
                          warmup_steps=2, source=str(text), skip_layers=[0], checkpoint_every=0)).run(ctx)
    assert get_adapter(model).decoder_linear_params() < 0.8 * dense
    ids = torch.tensor(_ByteTokenizer()(text.read_text(encoding="utf-8"))["input_ids"])
    held = ids[-4 * 16:].reshape(4, 16)
    before = compare_logits(family_model(family), model, held).mean_kl
    spec = get_pass("lora_recover")
    spec.cls(spec.options(steps=30, lr=1e-2, rank=4, batch_size=2, seqlen=16, warmup_steps=2, source=str(text),
                          loss="kl", checkpoint_every=0)).run(ctx)
    assert compare_logits(family_model(family), model, held).mean_kl < before
    export_safetensors(model, None, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(logits(reloaded), logits(model), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- the shipped recipe
@pytest.mark.slow
@pytest.mark.parametrize("family", ["gemma3_text", "olmo2", "phi3"])
def test_the_shipped_flap_recipe_runs_unchanged_on_a_tiny_model_of_each_family(family, tmp_path):
    """recipes/llama-flap-50.yaml with only the model, the sizes and the evaluation shortened: a
    tiny folder prunes, reloads, and passes the ONNX gates (logits and greedy tokens in ONNX Runtime
    and onnxruntime-genai). Three families, about 40 s each: sliding and global layers (Gemma 3),
    norms sliced with the heads (OLMo-2), fused projections unfused at load (Phi-3); Gemma, Gemma 2
    and Granite passed the same run when it was written, and their ONNX export is tested above."""
    import json
    from pathlib import Path

    from transformers import AutoTokenizer

    from compress.models.loading import embedded_model_folder
    from compress.recipe import load_recipe, parse_recipe
    from compress.run import run_recipe

    folder = tmp_path / family
    six = {"layer_types": ["sliding_attention", "full_attention"] * 3} if family == "gemma3_text" else {}
    tiny_model(family, vocab_size=49152, num_hidden_layers=6, **six).save_pretrained(folder)  # 4 pruned at 75%
    AutoTokenizer.from_pretrained(embedded_model_folder(progress=False)).save_pretrained(folder)
    data = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "llama-flap-50.yaml").to_dict()
    data["model"] = str(folder)
    data["calibration"].update(samples=8, seqlen=32)
    data["export"]["output"] = str(tmp_path / "out")
    data["evaluate"] = {"datasets": ["general:wiki"], "seqlen": 32, "max_windows": 4, "batch_size": 2,
                        "continuation_tokens": 0}
    data["validate"] = {**data["validate"], "max_geomean_ppl_ratio": None, "max_ppl_ratio": None,
                        "generation_tokens": 6}
    result = run_recipe(parse_recipe(data, "llama-flap-50.yaml"), progress=False)
    assert result.passed, result.failures
    gates = {g["name"] for g in json.loads((tmp_path / "out" / "report.json").read_text())["validation"]["gates"]}
    assert {"reload_max_abs_diff", "onnx_logits_allclose", "onnx_generation_identical"} <= gates
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert reloaded.config.base_model_type == ("mistral" if family == "phi3" else family)


def test_a_fused_onnx_graph_of_a_family_it_cannot_hold_is_refused_at_preflight(tmp_path):
    from typer.testing import CliRunner

    from compress.cli import app

    family_model("gemma3_text").save_pretrained(tmp_path / "gemma")
    recipe = _recipe(tmp_path, tmp_path / "gemma", formats=["safetensors", "onnx"], onnx={"graph": "fused"})
    result = CliRunner().invoke(app, ["run", recipe, "--dry-run"], env={"COLUMNS": "250"})
    text = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "export.onnx.graph" in text and "'gemma3_text'" in text and "use auto or traced" in text
    assert not (tmp_path / "out").exists()
    family_model("llama").save_pretrained(tmp_path / "llama")
    recipe = _recipe(tmp_path, tmp_path / "llama", formats=["safetensors", "onnx"], onnx={"graph": "fused", "fp16": True})
    result = CliRunner().invoke(app, ["run", recipe, "--dry-run"], env={"COLUMNS": "250"})
    assert result.exit_code == 2 and "float32" in " ".join(result.output.split()), result.output
