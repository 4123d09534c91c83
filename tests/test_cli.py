"""The `compress` CLI (with the pipeline/model modules faked) and the report writer."""

from __future__ import annotations

import json
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydantic import BaseModel, Field
from typer.testing import CliRunner

from compress import __version__, registry
from compress.cli import app
from compress.errors import CompressError
from compress.report import PLOT_PNG, REPORT_JSON, REPORT_MD, fmt_number, write_report

runner = CliRunner()
WIDE = {"COLUMNS": "200"}


class ToyPrune:
    """Toy pruning pass: removes the least busy channels."""

    kinds = ("decoder",)

    class Options(BaseModel):
        ratio: float = Field(0.5, gt=0, lt=1, description="Fraction of decoder linear weights to remove.")
        min_heads: int = Field(1, ge=1, description="Heads every layer keeps.")


@pytest.fixture(autouse=True)
def toy_registry(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", {})
    monkeypatch.setattr(registry, "_load_builtin_passes", lambda: None)
    registry.register_pass("toyprune")(ToyPrune)


@dataclass
class FakeRunResult:
    output_dir: Path
    report: dict
    passed: bool
    failures: list[str] = field(default_factory=list)


def sample_report(layers: int = 4) -> dict:
    """A report with every section, shaped like the pipeline's."""
    return {
        "recipe": "toy-50",
        "model": "smollm2-135m",
        "created": "2025-01-01T00:00:00+00:00",
        "device": "cpu",
        "dtype": "float32",
        "seed": 0,
        "params": {
            "dense": {"total": 134_515_008, "decoder_linear": 106_168_320},
            "pruned": {"total": 81_431_104, "decoder_linear": 53_084_160},
            "pruning_ratio": 0.5,
            "total_ratio": 0.3946,
            "target_ratio": 0.5,
        },
        "layers": [
            {"index": i, "heads": 9 - i, "kv_heads": 3, "intermediate": 1536 - 256 * i,
             "dense_heads": 9, "dense_kv_heads": 3, "dense_intermediate": 1536}
            for i in range(layers)
        ],
        "passes": [{"name": "toyprune", "options": {"ratio": 0.5}, "wall_s": 12.5, "peak_rss_mb": 1500.0,
                    "details": {"allocator": "global"}}],
        "stages": [
            {"name": "load", "wall_s": 3.0, "peak_rss_mb": 900.0},
            {"name": "toyprune", "wall_s": 12.5, "peak_rss_mb": 1500.0},
        ],
        "evaluation": {"seqlen": 128, "max_windows": 256,
                       "datasets": {"persuasion": {"dense_ppl": 51.7, "pruned_ppl": 90.2, "ppl_ratio": 1.745}},
                       "top1_agreement": 0.61, "mean_kl": 0.42},
        "validation": {"passed": True, "gates": [
            {"name": "reload_max_abs_diff", "value": 2e-6, "threshold": 1e-4, "op": "<=", "passed": True}]},
        "artifacts": {"dir": "outputs/toy-50", "files": ["config.json", "model.safetensors"]},
    }


def fake_module(monkeypatch, name: str, **attributes) -> types.ModuleType:
    """Install a stand-in module under ``name`` for the duration of a test."""
    module = types.ModuleType(name)
    for key, value in attributes.items():
        setattr(module, key, value)
    monkeypatch.setitem(sys.modules, name, module)
    return module


def write_recipe(tmp_path: Path, text: str = "model: smollm2-135m\npasses:\n  - toyprune: {ratio: 0.5}\n") -> Path:
    path = tmp_path / "toy.yaml"
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------ help, version
@pytest.mark.parametrize(
    "command, expected",
    [
        ([], ["run", "apply", "passes", "inspect", "eval", "validate", "generate", "--version"]),
        (["validate"], ["RECIPE", "FAILED", "--device", "--quiet"]),
        (["generate"], ["--onnx", "--max-new-tokens", "--device", "--ignore-eos"]),
        (["run"], ["--output", "--dry-run", "--device", "--quiet"]),
        (["apply"], ["--model", "--output", "--device", "--no-eval"]),
        (["passes"], ["options"]),
        (["inspect"], ["--device", "--dtype"]),
        (["eval"], ["--data", "--seqlen", "--windows", "--batch-size", "--device", "--dtype"]),
    ],
)
def test_help_explains_every_option(command, expected):
    result = runner.invoke(app, [*command, "--help"], env=WIDE)
    assert result.exit_code == 0, result.output
    for word in expected:
        assert word in result.output


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"compress {__version__}"


# ------------------------------------------------------------------------------ passes
def test_passes_lists_registered_pass_with_options():
    result = runner.invoke(app, ["passes"], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "toyprune" in result.output
    assert "Toy pruning pass" in result.output
    assert "ratio" in result.output and "float (> 0 and < 1)" in result.output
    assert "Fraction of decoder linear weights to remove." in result.output
    assert "min_heads" in result.output and "int (>= 1)" in result.output


# ------------------------------------------------------------------------------ run
def test_run_bad_recipe_exits_2_with_yaml_path(tmp_path):
    path = write_recipe(tmp_path, "model: smollm2-135m\npasses:\n  - toyprune: {ratio: 1.5}\ncolour: red\n")
    result = runner.invoke(app, ["run", str(path)], env=WIDE)
    assert result.exit_code == 2
    assert "error:" in result.output
    assert "passes[0].toyprune.ratio: must be > 0 and < 1 (got 1.5)" in result.output
    assert "colour: unknown field" in result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_run_bad_yaml_and_missing_file_exit_2(tmp_path):
    path = write_recipe(tmp_path, "passes: [\n")
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 2 and "invalid YAML" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["run", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "recipe file not found" in result.output


def test_run_rejects_unknown_device_option(tmp_path):
    result = runner.invoke(app, ["run", str(write_recipe(tmp_path)), "--device", "gpu"], env=WIDE)
    assert result.exit_code == 2
    assert "--device" in result.output and "cuda:N" in result.output


def test_dry_run_prints_the_description_and_runs_nothing(tmp_path, monkeypatch):
    seen = {}

    def dry_run_lines(recipe, output=None, overwrite=False):
        seen["recipe"], seen["output"] = recipe, output
        return [f"recipe {recipe.name}", f"pass 1 {recipe.passes[0].name}"]

    def run_recipe(*args, **kwargs):
        raise AssertionError("a dry run must not run the pipeline")

    fake_module(monkeypatch, "compress.run.describe", dry_run_lines=dry_run_lines)
    fake_module(monkeypatch, "compress.run", run_recipe=run_recipe)
    result = runner.invoke(app, ["run", str(write_recipe(tmp_path)), "--dry-run", "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "recipe toy" in result.output and "pass 1 toyprune" in result.output
    assert seen["output"] == tmp_path / "out"


def test_run_prints_summary_and_passes_overrides(tmp_path, monkeypatch):
    calls = {}

    def run_recipe(recipe, *, output=None, dry_run=False, device=None, progress=True, overwrite=False):
        calls.update(recipe=recipe, output=output, dry_run=dry_run, device=device, progress=progress,
                     overwrite=overwrite)
        return FakeRunResult(output_dir=output, report=sample_report(), passed=True)

    fake_module(monkeypatch, "compress.run", run_recipe=run_recipe)
    arguments = ["run", str(write_recipe(tmp_path)), "-o", str(tmp_path / "out"), "--device", "cpu"]
    result = runner.invoke(app, arguments, env=WIDE)
    assert result.exit_code == 0, result.output
    assert calls["output"] == tmp_path / "out" and calls["device"] == "cpu" and calls["dry_run"] is False
    assert calls["recipe"].passes[0].name == "toyprune"
    for text in ("106,168,320", "53,084,160", "PPL persuasion", "51.70", "90.20", "pruning ratio", "50.0%", "passed"):
        assert text in result.output
    assert str(tmp_path / "out") in result.output


def test_run_failed_gate_exits_3_with_each_failure(tmp_path, monkeypatch):
    def run_recipe(recipe, **kwargs):
        report = sample_report()
        report["validation"]["passed"] = False
        return FakeRunResult(tmp_path / "out", report, passed=False, failures=["ppl_ratio = 1.745 (must be <= 1.5)"])

    fake_module(monkeypatch, "compress.run", run_recipe=run_recipe)
    result = runner.invoke(app, ["run", str(write_recipe(tmp_path)), "--quiet"])
    assert result.exit_code == 3
    assert "gate failed: ppl_ratio = 1.745 (must be <= 1.5)" in result.output
    assert "PPL persuasion" not in result.output  # --quiet: no summary table


def test_user_errors_from_the_pipeline_are_one_line(tmp_path, monkeypatch):
    def run_recipe(recipe, **kwargs):
        raise CompressError("model source 'x' not found")

    fake_module(monkeypatch, "compress.run", run_recipe=run_recipe)
    result = runner.invoke(app, ["run", str(write_recipe(tmp_path))])
    assert result.exit_code == 2
    assert "error: model source 'x' not found" in result.output
    assert "Traceback" not in result.output


# ------------------------------------------------------------------------------ apply
def test_apply_calls_the_pipeline(tmp_path, monkeypatch):
    plan = tmp_path / "plan.json"
    plan.write_text("{}", encoding="utf-8")
    calls = {}

    def apply_plan_file(plan_path, model_source, output, *, device=None, dtype="float32", progress=True, evaluate=True,
                        overwrite=False, max_memory=None):
        calls.update(plan=plan_path, model=model_source, output=output, device=device, evaluate=evaluate,
                     overwrite=overwrite, max_memory=max_memory)
        return FakeRunResult(output, sample_report(), passed=True)

    fake_module(monkeypatch, "compress.run", apply_plan_file=apply_plan_file)
    out = tmp_path / "out2"
    arguments = ["apply", str(plan), "--model", "smollm2-135m", "-o", str(out), "--device", "cpu", "--no-eval"]
    result = runner.invoke(app, arguments)
    assert result.exit_code == 0, result.output
    assert calls == {"plan": plan, "model": "smollm2-135m", "output": out, "device": "cpu", "evaluate": False,
                     "overwrite": False, "max_memory": None}


def test_apply_missing_plan_exits_2(tmp_path):
    result = runner.invoke(app, ["apply", str(tmp_path / "plan.json"), "-m", "m", "-o", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "plan file not found" in result.output and "Traceback" not in result.output


# ------------------------------------------------------------------------------ inspect, eval
@dataclass
class FakeLoaded:
    model: object
    tokenizer: object


def test_inspect_runs_for_real_on_a_pruned_folder(tmp_path):
    """`compress inspect` on a tiny decoder pruned to per-layer widths (no fakes): the parameter counts
    and the per-layer widths it prints are the adapter's."""
    from compress.models.adapters import get_adapter
    from compress.models.loading import load_model
    from compress.run import apply_plan
    from compress.plan import LayerPlan, Plan, PlanStep
    from exporters.safetensors import export_safetensors
    from tests.conftest import tiny_smol_folder

    folder = tiny_smol_folder(tmp_path / "tiny")
    loaded = load_model(str(folder), device="cpu", progress=False)
    plan = Plan(steps=[PlanStep("manual", {}, [LayerPlan(index=1, keep_channels=list(range(40)))])])
    apply_plan(loaded.model, plan)
    export_safetensors(loaded.model, loaded.tokenizer, tmp_path / "pruned")
    result = runner.invoke(app, ["inspect", str(tmp_path / "pruned"), "--device", "cpu"], env=WIDE)
    assert result.exit_code == 0, result.output
    counts = get_adapter(loaded.model).param_counts()
    for text in ("LlamaForCausalLM", f"{counts['total']:,}", f"{counts['decoder_linear']:,}", "width per layer",
                 "40", "96"):
        assert text in result.output, text


def test_eval_runs_for_real_and_matches_the_perplexity_function(tmp_path):
    """`compress eval` on a tiny model (no fakes): its table and JSON equal perplexity() on the same windows."""
    from compress.calibration.sources import read_text, sequential_windows, tokenize_text
    from compress.evaluation.perplexity import perplexity
    from compress.models.loading import load_model
    from tests.conftest import tiny_smol_folder

    folder = tiny_smol_folder(tmp_path / "tiny")
    out = tmp_path / "eval.json"
    result = runner.invoke(app, ["eval", str(folder), "-d", "austen:persuasion", "-d", "general:chat", "--seqlen", "16",
                                 "--windows", "3", "--device", "cpu", "--json", str(out)], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "persuasion" in result.output and "chat" in result.output
    figures = json.loads(out.read_text())["evaluation"]["datasets"]
    loaded = load_model(str(folder), device="cpu", progress=False)
    for name, source in (("persuasion", "austen:persuasion"), ("chat", "general:chat")):
        windows = sequential_windows(tokenize_text(loaded.tokenizer, read_text(source)), 16, 3)
        expected = perplexity(loaded.model, windows, batch_size=2, progress=False).ppl
        assert figures[name]["windows"] == 3 and figures[name]["tokens"] == 45  # 3 windows x 15 predictions
        assert figures[name]["pruned_ppl"] == pytest.approx(expected, rel=1e-5)
        assert fmt_number(expected) in result.output


def test_eval_rejects_unknown_text_before_loading(monkeypatch):
    fake_module(monkeypatch, "compress.models.loading",
                load_model=lambda *a, **k: (_ for _ in ()).throw(AssertionError("must not load")))
    result = runner.invoke(app, ["eval", "m", "--data", "austen:persuation"], env=WIDE)
    assert result.exit_code == 2
    assert "--data" in result.output and "austen:persuasion" in result.output


# ------------------------------------------------------------------------------ report
def test_write_report_writes_json_markdown_and_plot(tmp_path):
    report = sample_report(layers=6)
    write_report(tmp_path / "run", report)
    folder = tmp_path / "run"
    assert json.loads((folder / REPORT_JSON).read_text()) == report
    png = (folder / PLOT_PNG).read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000
    markdown = (folder / REPORT_MD).read_text()
    assert markdown.startswith("# Compression report: toy-50")
    assert "| Decoder linears | 106,168,320 | 53,084,160 | 50.0% |" in markdown
    assert "| persuasion | 51.70 | 90.20 | 1.745 |" in markdown
    assert "| Layer | Query heads | KV heads | MLP channels | Heads kept | Channels kept |" in markdown
    assert "| 1 | 8 / 9 | 3 / 3 | 1280 / 1536 | 88.9% | 83.3% |" in markdown
    assert "| toyprune | ratio=0.5 | 12.50 | 1500.0 |" in markdown
    assert "| load | 3.000 | 900.00 |" in markdown
    assert "**PASSED**" in markdown and "| reload_max_abs_diff | 2.000e-06 | <= 1.000e-04 | pass |" in markdown
    assert f"![kept width per layer]({PLOT_PNG})" in markdown
    assert "- `model.safetensors`" in markdown


def test_write_report_skips_missing_sections_and_keeps_json_strict(tmp_path):
    write_report(tmp_path, {"recipe": "bare", "model": "m", "params": {"dense": {"total": 10}, "pruned": {"total": 5},
                                                                     "pruning_ratio": float("inf")}})
    markdown = (tmp_path / REPORT_MD).read_text()
    assert "## Parameters" in markdown
    for absent in ("## Evaluation", "## Validation", "## Kept width", "## Passes", "## Stages", "## Artifacts"):
        assert absent not in markdown
    assert not (tmp_path / PLOT_PNG).exists()
    data = json.loads((tmp_path / REPORT_JSON).read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    assert data["params"]["pruning_ratio"] == "inf"


# ------------------------------------------------------------------------------ inspect a torch factory
FACTORY = "tests.torch_factories:small_cnn"


def test_inspect_torch_factory_lists_the_torch_pruning_groups():
    result = runner.invoke(app, ["inspect", FACTORY, "--input-shape", "1,3,8,8"], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "2 prunable groups, 1 frozen" in result.output and "[1, 3, 8, 8]" in result.output
    assert "conv1.out (+bn1, conv2.in)" in result.output and "conv2.out (+fc.in)" in result.output
    assert "reaches the model output" in result.output  # the frozen classifier rows, summarised by reason
    listed = runner.invoke(app, ["inspect", FACTORY, "--input-shape", "2, 3, 8, 8", "--all"], env=WIDE)
    assert listed.exit_code == 0, listed.output
    assert "fc.out" in listed.output and "frozen: reaches the model output" in listed.output


@pytest.mark.parametrize(
    "arguments, message",
    [
        ([FACTORY], "needs --input-shape"),
        ([FACTORY, "--input-shape", "1,3,x,8"], "--input-shape: expected comma-separated positive integers"),
        ([FACTORY, "--input-shape", "1,3,0,8"], "--input-shape: expected comma-separated positive integers"),
        ([FACTORY, "--input-shape", "1,4,8,8"], "a forward pass on an input of shape [1, 4, 8, 8] failed"),
        (["tests.no_such_module:small_cnn", "--input-shape", "1,3,8,8"], "cannot import module 'tests.no_such_module'"),
        (["tests.torch_factories:missing", "--input-shape", "1,3,8,8"], "has no attribute 'missing'"),
        (["tests.torch_factories:NOT_CALLABLE", "--input-shape", "1,3,8,8"], "not a callable"),
        (["tests.torch_factories:not_a_module", "--input-shape", "1,3,8,8"], "returned a dict, not a torch nn.Module"),
        (["tests.torch_factories:broken", "--input-shape", "1,3,8,8"], "calling broken() failed (ValueError: weights"),
        (["model.onnx", "--input-shape", "1,3,8,8"], "--input-shape applies only to a MODEL of the form"),
    ],
)
def test_inspect_torch_factory_errors_exit_2(arguments, message):
    result = runner.invoke(app, ["inspect", *arguments], env=WIDE)
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and message in result.output and "Traceback" not in result.output
