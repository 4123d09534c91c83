"""Export of (pruned) MoE decoders: the static all-experts form, ONNX with a KV cache, per-layer
expert counts saved with the pruned_moe modeling file, and a full recipe run with both formats."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from conftest import remote_code_logits
from test_moe import BATCH, logits, run_moe_pass, tiny_moe
from test_onnx import FP32_ATOL, FP32_RTOL, assert_prefill_and_cached_decode_match
from transformers import AutoModelForCausalLM

from compress.errors import CompressError
from compress.models.adapters import get_adapter
from compress.models.moe import MoeAdapter
from compress.models.moe_static import StaticMoeBlock, static_moe_blocks
from compress.models.pruned_moe import PrunedMixtralConfig, PrunedQwen3MoeConfig, pruned_moe_classes
from compress.onnx_runtime import OrtDecoder
from exporters.onnx import OnnxExportOptions, export_onnx
from exporters.moe import export_moe_safetensors as export_safetensors

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe"]
NO_SLIM = OnnxExportOptions(slim=False)  # onnxslim adds seconds and is covered by the recipe run


pytestmark = pytest.mark.usefixtures("one_thread")


def globally_pruned(family: str):
    """A tiny MoE pruned with `allocator: global` so that its sparse layers keep different counts:
    the last sparse layer's router is made peaked (two rows × 20), so EASY-EP concentrates there."""
    model = tiny_moe(family)
    with torch.no_grad():
        model.model.layers[-1].mlp.gate.weight[:2] *= 20
    run_moe_pass(model, keep=5, allocator="global", score="easy_ep")
    counts = sorted(set(MoeAdapter(model).expert_counts().values()))
    assert len(counts) > 1, counts
    return model


# ----------------------------------------------------------------------------- the static form
@pytest.mark.parametrize("family,overrides", [
    ("mixtral", {}), ("qwen2_moe", {}), ("qwen2_moe", {"norm_topk_prob": False}), ("qwen3_moe", {}),
])
def test_static_form_equals_the_stock_forward_and_is_restored(family, overrides):
    model = tiny_moe(family, **overrides)
    reference = logits(model)
    blocks = [layer.mlp for layer in model.model.layers]
    with static_moe_blocks(model):
        assert sum(isinstance(layer.mlp, StaticMoeBlock) for layer in model.model.layers) == len(
            MoeAdapter(model).moe_layers())
        static = logits(model)
        names = set(dict(model.named_parameters()))
    assert (static - reference).abs().max() < 1e-5
    assert [layer.mlp for layer in model.model.layers] == blocks
    assert names == set(dict(model.named_parameters()))  # same parameter names in the static form


@pytest.mark.parametrize("family", FAMILIES)
def test_static_form_of_a_globally_pruned_model(family):
    model = globally_pruned(family)
    reference = logits(model)
    with static_moe_blocks(model):
        assert (logits(model) - reference).abs().max() < 1e-5


def test_static_form_of_the_transformers_4_list_layout():
    from test_moe import tiny_list_layout

    model = tiny_list_layout()  # nn.Linear routers and nn.ModuleList experts (one expert at a time)
    reference = logits(model)
    with static_moe_blocks(model):
        assert (logits(model) - reference).abs().max() < 1e-5


def test_fused_all_outputs_equals_each_experts_output():
    experts = MoeAdapter(tiny_moe("mixtral")).moe_layers()[0].experts
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        stacked = torch.stack([experts.expert_output(i, x) for i in range(experts.num_experts)])
        assert torch.allclose(experts.all_outputs(x), stacked, atol=1e-6)


def test_routing_matrix_is_the_routers_top_k_and_zero_elsewhere():
    model = tiny_moe("qwen2_moe", norm_topk_prob=False)
    layer = MoeAdapter(model).moe_layers()[0]
    x = torch.randn(7, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, weights, indices = layer.router(x)
        matrix = layer.routing_matrix(x)
    assert matrix.shape == (7, 8) and ((matrix > 0).sum(dim=1) == 2).all()
    assert torch.equal(matrix.gather(1, indices), weights.float())
    assert (matrix.sum(dim=1) < 1).all()  # not renormalised: this router does not renormalise


# ----------------------------------------------------------------------------- ONNX
@pytest.mark.parametrize("family,prune", [("mixtral", False), ("qwen2_moe", False), ("qwen3_moe", True)])
def test_onnx_export_matches_torch_dense_and_uniformly_pruned(family, prune, tmp_path):
    model = tiny_moe(family)
    if prune:
        run_moe_pass(model, keep=5, top_k=1)
        assert set(MoeAdapter(model).expert_counts().values()) == {5}
    exported = export_onnx(model, None, tmp_path, NO_SLIM)
    assert exported.spec.kv_heads == [2] * len(model.model.layers)
    assert not any(isinstance(layer.mlp, StaticMoeBlock) for layer in model.model.layers)  # the copy was traced
    assert_prefill_and_cached_decode_match(model, OrtDecoder(exported.folder), FP32_ATOL, FP32_RTOL)


# ----------------------------------------------------------------------------- per-layer counts
@pytest.mark.parametrize("family", FAMILIES)
def test_per_layer_counts_save_and_reload_with_identical_logits(family, tmp_path):
    model = globally_pruned(family)
    counts = MoeAdapter(model).num_experts_per_layer()
    exported = export_safetensors(model, None, tmp_path)
    config_class, model_class = pruned_moe_classes(family)
    assert not exported["uniform"] and exported["config_class"] == config_class.__name__
    assert "pruned_moe.py" in exported["files"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == config_class.model_type and config["base_model_type"] == family
    assert config["num_experts_per_layer"] == counts
    assert config["auto_map"]["AutoModelForCausalLM"] == f"pruned_moe.{model_class.__name__}"

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # compress is imported: no remote code
    assert type(reloaded) is model_class
    assert MoeAdapter(reloaded).num_experts_per_layer() == counts
    assert torch.equal(logits(reloaded), logits(model))
    trusted = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert torch.equal(logits(trusted), logits(model))


def test_per_layer_counts_are_saved_in_the_hub_per_expert_layout(tmp_path):
    from safetensors import safe_open

    model = globally_pruned("mixtral")
    export_safetensors(model, None, tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        names = set(f.keys())
    counts = MoeAdapter(model).num_experts_per_layer()
    for layer, count in enumerate(counts):
        experts = {n for n in names if n.startswith(f"model.layers.{layer}.block_sparse_moe.experts.")}
        assert len(experts) == 3 * count  # w1, w2, w3 per kept expert
    assert not any("gate_up_proj" in n for n in names)


def test_a_reloaded_pruned_model_exports_to_onnx_and_re_exports(tmp_path):
    model = globally_pruned("qwen3_moe")  # dense layer 1 between two sparse layers of 7 and 3 experts
    export_safetensors(model, None, tmp_path / "a")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "a").eval()
    exported = export_onnx(reloaded, None, tmp_path / "onnx", NO_SLIM)
    assert_prefill_and_cached_decode_match(model, OrtDecoder(exported.folder), FP32_ATOL, FP32_RTOL)
    again = export_safetensors(reloaded, None, tmp_path / "b")  # stays a pruned_moe model
    assert again["config_class"] == "PrunedQwen3MoeConfig"
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "b")), logits(model))


def test_globally_pruned_qwen2_moe_with_shared_expert_exports_to_onnx(tmp_path):
    model = globally_pruned("qwen2_moe")
    exported = export_onnx(model, None, tmp_path, NO_SLIM)
    assert_prefill_and_cached_decode_match(model, OrtDecoder(exported.folder), FP32_ATOL, FP32_RTOL)


def test_per_layer_top_k_is_refused_with_a_clear_error(tmp_path):
    model = tiny_moe("mixtral")
    adapter = get_adapter(model)
    adapter.moe_layers()[1].set_top_k(1)
    with pytest.raises(CompressError, match="different numbers of experts per token"):
        export_safetensors(model, None, tmp_path)


def test_pruned_configs_check_their_per_layer_counts():
    from huggingface_hub.errors import StrictDataclassClassValidationError as Invalid

    config = PrunedQwen3MoeConfig(num_hidden_layers=3, num_experts=8, num_experts_per_tok=2, mlp_only_layers=[1])
    assert config.num_experts_per_layer == [8, 0, 8]  # filled from the scalar count
    with pytest.raises(Invalid, match=r"num_experts_per_layer\[1\] is 4, but layer 1 is a dense MLP layer"):
        PrunedQwen3MoeConfig(num_hidden_layers=3, num_experts=8, num_experts_per_tok=2, mlp_only_layers=[1],
                             num_experts_per_layer=[8, 4, 8])
    with pytest.raises(Invalid, match=r"num_experts_per_layer\[0\] is 1; a sparse layer needs at least"):
        PrunedMixtralConfig(num_hidden_layers=2, num_local_experts=8, num_experts_per_layer=[1, 8])
    with pytest.raises(Invalid, match="has 3 entries but num_hidden_layers is 2"):
        PrunedMixtralConfig(num_hidden_layers=2, num_local_experts=8, num_experts_per_layer=[8, 8, 8])


def test_remote_code_loads_without_the_compress_package(tmp_path):
    model = globally_pruned("qwen2_moe")
    export_safetensors(model, None, tmp_path / "export")
    assert torch.equal(remote_code_logits(tmp_path / "export", BATCH, tmp_path), logits(model))


# ----------------------------------------------------------------------------- recipe
def test_recipe_with_global_allocator_exports_safetensors_and_onnx_and_passes_its_gates(tmp_path):
    from compress.models.loading import load_model
    from compress.run import run_recipe
    from compress.recipe import parse_recipe

    from transformers import AutoTokenizer

    from compress.models.loading import embedded_model_folder

    folder = tmp_path / "tiny-moe"  # SmolLM2's tokenizer; layer 1's router peaked, as in globally_pruned
    model = tiny_moe("mixtral", vocab_size=49152)
    with torch.no_grad():
        model.model.layers[1].mlp.gate.weight[:2] *= 20
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(embedded_model_folder(progress=False)).save_pretrained(folder)
    text = tmp_path / "demo.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
                    "must be in want of a wife. " * 40)
    recipe = parse_recipe({
        "name": "tiny-mixtral-global",
        "model": str(folder),
        "device": "cpu",
        "calibration": {"source": str(text), "samples": 8, "seqlen": 32, "batch_size": 4},
        "passes": [{"moe_experts": {"keep": 5, "score": "easy_ep", "allocator": "global"}}],
        "export": {"output": str(tmp_path / "out"), "formats": ["safetensors", "onnx"]},
        "evaluate": None,  # perplexity is not what this test is about (and takes minutes)
        "validate": {"reload_max_abs_diff": 0.0, "onnx_windows": 2, "onnx_decode_steps": 3,
                     "generation_tokens": 6, "generation_prompts": ["It is a truth"]},
    }, "test.yaml")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = run_recipe(recipe, progress=False)
    assert result.passed, result.failures
    gates = {gate["name"]: gate for gate in result.report["validation"]["gates"]}
    assert {"reload_max_abs_diff", "onnx_graph_valid", "onnx_logits_allclose", "onnx_present_allclose",
            "onnx_generation_identical", "genai_generation_identical"} <= set(gates)
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    counts = [len(r["kept"]) for r in plan["steps"][0]["details"]["moe_layers"]]
    assert len(set(counts)) > 1 and sum(counts) == 10
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "pruned_mixtral" and config["num_experts_per_layer"] == counts
    assert (tmp_path / "out" / "onnx" / "model.onnx").is_file()

    loaded = load_model(str(tmp_path / "out"), progress=False)  # compress.models.loading
    assert MoeAdapter(loaded.model).num_experts_per_layer() == counts
    ids = np.array([[1, 2, 3, 4]])
    with torch.no_grad():
        assert loaded.model(torch.from_numpy(ids)).logits.shape[-1] == 49152
