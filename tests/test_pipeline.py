"""End to end through the pipeline on a tiny random decoder that uses the real SmolLM2 tokenizer."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import compress  # noqa: F401  (registers pruned_llama)
from compress.errors import CompressError
from compress.run import apply_plan_file, run_recipe
from compress.recipe import parse_recipe
from conftest import tiny_model


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny Llama with SmolLM2's vocabulary and tokenizer, saved as safetensors; head_dim 16, so
    its ONNX export is the fused graph (as SmolLM2's is)."""
    from compress.models.loading import embedded_model_folder

    folder = tmp_path_factory.mktemp("tiny-smol")
    model = tiny_model(vocab_size=49152, head_dim=16)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(embedded_model_folder(progress=False)).save_pretrained(folder)
    return folder


def recipe_for(folder, output, **overrides):
    data = {
        "name": "tiny-flap",
        "model": str(folder),
        "device": "cpu",
        "calibration": {"source": "austen", "samples": 8, "seqlen": 32, "seed": 0, "batch_size": 4},
        "passes": [{"flap": {"ratio": 0.4}}],
        "export": {"output": str(output)},
        "evaluate": {"datasets": ["austen:persuasion"], "seqlen": 32, "max_windows": 4, "batch_size": 2},
        "validate": {"reload_max_abs_diff": 1e-4},
    }
    data.update(overrides)
    return parse_recipe(data, "test.yaml")


@pytest.mark.slow
def test_run_writes_a_reloadable_artifact_and_a_report(tiny_folder, tmp_path):
    out = tmp_path / "out"
    result = run_recipe(recipe_for(tiny_folder, out), progress=False)
    assert result.passed, result.failures
    for name in ("config.json", "model.safetensors", "plan.json", "report.json", "report.md", "kept_widths.png", "tokenizer.json"):
        assert (out / name).is_file(), name
    assert not any(p.name.startswith(".out.") for p in tmp_path.iterdir())  # the staging folder is gone

    report = json.loads((out / "report.json").read_text())
    assert abs(report["params"]["pruning_ratio"] - 0.4) < 0.05
    assert report["params"]["total_ratio"] < report["params"]["pruning_ratio"]
    assert {s["name"] for s in report["stages"]} >= {"load", "pass:flap", "export", "reload check", "evaluate"}
    assert report["evaluation"]["datasets"]["persuasion"]["dense_ppl"] > 0
    assert len(report["layers"]) == 4

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert reloaded(ids).logits.isfinite().all()


@pytest.mark.slow
def test_apply_reproduces_the_run_bit_for_bit(tiny_folder, tmp_path):
    first = run_recipe(recipe_for(tiny_folder, tmp_path / "a"), progress=False)
    replay = apply_plan_file(first.output_dir / "plan.json", str(tiny_folder), tmp_path / "b", device="cpu",
                             progress=False, evaluate=False)
    assert replay.passed
    original = load_file(tmp_path / "a" / "model.safetensors")
    replayed = load_file(tmp_path / "b" / "model.safetensors")
    assert original.keys() == replayed.keys()
    for key in original:
        assert torch.equal(original[key], replayed[key]), key


@pytest.mark.slow
def test_a_failed_gate_is_reported_and_the_artifact_marked(tiny_folder, tmp_path):
    recipe = recipe_for(tiny_folder, tmp_path / "out", validate={"reload_max_abs_diff": 1e-4, "max_ppl_ratio": 1.0001})
    result = run_recipe(recipe, progress=False)
    assert not result.passed
    assert "ppl_ratio" in result.failures[0] and "1.0001" in result.failures[0]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["validation"]["passed"] is False
    assert "ppl_ratio" in (tmp_path / "out" / "FAILED").read_text()


ONNX_GATES = {"onnx_graph_valid", "onnx_logits_allclose", "onnx_present_allclose", "onnx_generation_identical",
              "genai_generation_identical"}  # onnxruntime-genai comes with the cpu extra


@pytest.mark.slow
def test_onnx_export_is_validated_in_the_run_and_again_by_validate(tiny_folder, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from compress.cli import app
    from compress.run.validate import validate_artifact

    out = tmp_path / "out"
    recipe = recipe_for(tiny_folder, out, export={"output": str(out), "formats": ["safetensors", "onnx"]},
                        validate={"generation_tokens": 8})
    result = run_recipe(recipe, progress=False)
    assert result.passed, result.failures
    for name in ("onnx/model.onnx", "onnx/model.onnx.data", "onnx/export.json", "onnx/genai_config.json",
                 "onnx/tokenizer.json", "recipe.yaml"):
        assert (out / name).is_file(), name
    assert not (out / "FAILED").exists()
    report = json.loads((out / "report.json").read_text())
    assert ONNX_GATES <= {g["name"] for g in report["validation"]["gates"]}
    validation = report["onnx"]["validation"]
    assert validation["provider"] == "CPUExecutionProvider"
    assert validation["parity"]["logits"]["max_abs"] < 1e-4
    assert validation["parity"]["decode_steps"] == 4
    assert all(p["identical"] and len(p["onnx_tokens"]) > 0 for p in validation["generation"]["prompts"])
    assert all(p["identical"] for p in validation["genai"]["prompts"])
    assert {s["name"] for s in report["stages"]} >= {"export onnx", "validate onnx"}
    assert "## ONNX" in (out / "report.md").read_text()

    again = validate_artifact(out, progress=False)  # thresholds from the recipe copy in the folder
    assert again.passed, again.failures
    assert json.loads((out / "report.json").read_text())["validation"]["revalidated"] is True

    strict = recipe.to_dict()
    strict["validate"].update(onnx_atol=0.0, onnx_rtol=0.0)
    strict_path = tmp_path / "strict.yaml"
    strict_path.write_text(yaml.safe_dump(strict))
    cli = CliRunner().invoke(app, ["validate", "-q", str(strict_path)])
    assert cli.exit_code == 3, cli.output
    assert "gate failed: onnx_logits_allclose" in cli.output and "must be <= 1.0" in cli.output
    assert "onnx_logits_allclose" in (out / "FAILED").read_text()
    assert json.loads((out / "report.json").read_text())["validation"]["passed"] is False

    # weights of the graph changed behind its back: the parity gates fail at the recipe's own tolerances
    import numpy as np

    data = out / "onnx" / "model.onnx.data"
    weights = np.fromfile(data, dtype=np.float32)
    weights[len(weights) // 2:] *= 1.5
    weights.tofile(data)
    damaged = validate_artifact(out, progress=False)
    assert not damaged.passed
    failed = {g["name"] for g in json.loads((out / "report.json").read_text())["validation"]["gates"] if not g["passed"]}
    assert {"onnx_logits_allclose", "onnx_present_allclose"} <= failed, failed


def test_a_failing_run_leaves_no_output_folder(tmp_path):
    recipe = recipe_for(tmp_path / "missing-model", tmp_path / "out")
    with pytest.raises(CompressError):
        run_recipe(recipe, progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_quantized_onnx_variants_are_written_and_validated_against_the_float_graph(tiny_folder, tmp_path):
    out = tmp_path / "out"
    recipe = recipe_for(tiny_folder, out, export={"output": str(out), "formats": ["safetensors", "onnx"],
                                                  "onnx": {"quantize": ["int8", "int4"], "block_size": 16,
                                                           "optimize": False}},
                        evaluate=None, validate={"generation_tokens": 6, "generation_prompts": ["It is a truth"],
                                                 "quant_windows": 3})
    result = run_recipe(recipe, progress=False)
    report = json.loads((out / "report.json").read_text())
    gates = {g["name"]: g for g in report["validation"]["gates"]}
    assert {"onnx_int8_ppl_ratio", "onnx_int8_top1_agreement", "onnx_int8_generation_identical",
            "onnx_int4_ppl_ratio", "onnx_int4_top1_agreement"} <= set(gates)
    # the gates are real measurements: int8 stays closer to the float graph than int4
    assert gates["onnx_int8_ppl_ratio"]["value"] == pytest.approx(1.0, abs=0.02)
    assert abs(gates["onnx_int4_ppl_ratio"]["value"] - 1) > abs(gates["onnx_int8_ppl_ratio"]["value"] - 1)
    assert result.passed == all(g["passed"] for g in gates.values())
    variants = {v["dir"]: v for v in report["onnx_quantized"]}
    assert set(variants) == {"onnx-int8", "onnx-int4"}
    # int8: the decoder linears only (the tied head and embedding stay float); int4: the embedding and head too
    assert variants["onnx-int4"]["bytes"] < variants["onnx-int8"]["bytes"] < report["onnx"]["bytes"]
    for folder in ("onnx-int8", "onnx-int4"):
        spec = json.loads((out / folder / "export.json").read_text())
        assert spec["quantization"]["bits"] == int(folder[-1]) and spec["quantization"]["block_size"] == 16
        assert (out / folder / "genai_config.json").is_file() and (out / folder / "tokenizer.json").is_file()
    import onnx

    ops = {n.op_type for n in onnx.load(str(out / "onnx-int4" / "model.onnx"), load_external_data=False).graph.node}
    assert {"MatMulNBits", "GatherBlockQuantized"} <= ops
    ops8 = [n.op_type for n in onnx.load(str(out / "onnx-int8" / "model.onnx"), load_external_data=False).graph.node]
    assert report["onnx"]["graph"] == "fused"  # q, k and v packed in one MatMul per layer
    assert ops8.count("MatMulNBits") == 5 * 4  # every decoder linear; the tied head stays a float MatMul
    def levels(folder):
        return {onnx.helper.get_attribute_value(a) for n in onnx.load(str(out / folder / "model.onnx"),
                load_external_data=False).graph.node if n.op_type == "MatMulNBits" for a in n.attribute
                if a.name == "accuracy_level"}

    assert levels("onnx-int4") == {4} and levels("onnx-int8") == set()  # int8 activations for int4 only
    assert "## Quantized ONNX" in (out / "report.md").read_text()

    from compress.run.validate import validate_artifact

    again = validate_artifact(out, progress=False)  # compress validate re-checks the quantized graphs too
    assert {"onnx_int8_ppl_ratio", "onnx_int4_top1_agreement"} <= {g["name"] for g in again.report["validation"]["gates"]}


def test_quantize_and_gguf_on_an_encoder_are_refused_before_loading(tmp_path):
    import yaml
    from transformers import BertConfig, BertModel
    from typer.testing import CliRunner

    from compress.cli import app

    folder = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(folder)
    recipe = tmp_path / "enc.yaml"
    recipe.write_text(yaml.safe_dump({"name": "enc", "model": str(folder), "passes": [{"heads": {"ratio": 0.25}}],
                                      "export": {"output": str(tmp_path / "o"), "formats": ["onnx", "gguf"],
                                                 "onnx": {"quantize": ["int4"]}}, "evaluate": None}))
    result = CliRunner().invoke(app, ["run", "--dry-run", str(recipe)])
    assert result.exit_code == 2, result.output
    assert "export.onnx.quantize" in result.output and "weight-only ONNX quantization" in result.output
    assert "export.formats[1]" in result.output and "GGUF is written for LLaMA-family decoders" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_gguf_is_written_for_llama_cpp_and_checked_when_it_is_built(tiny_folder, tmp_path):
    import importlib.util

    import gguf

    out = tmp_path / "out"
    recipe = recipe_for(tiny_folder, out, export={"output": str(out), "formats": ["safetensors", "gguf"],
                                                  "gguf": {"dtype": "f32"}},
                        evaluate=None, validate={"generation_tokens": 6, "generation_prompts": ["It is a truth"]})
    result = run_recipe(recipe, progress=False)
    assert result.passed, result.failures
    report = json.loads((out / "report.json").read_text())
    assert report["gguf"]["architecture"] == "deci"  # FLAP leaves per-layer widths and biases
    reader = gguf.GGUFReader(str(out / "gguf" / "model.gguf"))
    heads = list(reader.fields["deci.attention.head_count"].contents())
    assert heads == [layer["heads"] for layer in report["layers"]]
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert len(reader.fields["tokenizer.ggml.tokens"].contents()) == 49152
    gates = {g["name"] for g in report["validation"]["gates"]}
    if importlib.util.find_spec("llama_cpp") is not None:
        assert {"gguf_logits_allclose", "gguf_generation_identical"} <= gates
    else:
        assert "skipped" in report["gguf"]["validation"] and "gguf_logits_allclose" not in gates
    assert "## GGUF (llama.cpp)" in (out / "report.md").read_text()
    from compress.run.validate import validate_artifact

    again = validate_artifact(out, progress=False)  # compress validate re-checks the GGUF too
    assert again.passed, again.failures
    assert ("gguf_logits_allclose" in {g["name"] for g in again.report["validation"]["gates"]}) == (
        importlib.util.find_spec("llama_cpp") is not None)
