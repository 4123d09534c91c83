"""`compress plan` (score + allocate, write plan.json) and calibration-free recipes."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

import compress  # noqa: F401  (registers pruned_llama)
from compress.cli import app
from compress.errors import RecipeError
from compress.run import apply_plan_file, run_recipe
from compress.recipe import parse_recipe
from conftest import assert_same_safetensors, tiny_smol_folder

runner = CliRunner()
WIDE = {"COLUMNS": "200"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_smol_folder(tmp_path_factory.mktemp("tiny-smol"))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    from compress.calibration.sources import read_text

    path = tmp_path_factory.mktemp("text") / "calibration.txt"
    path.write_text(read_text("austen:persuasion")[:20000], encoding="utf-8")
    return path


def write_recipe(tmp_path, folder, text_file, passes, **overrides):
    data = {
        "name": "tiny",
        "model": str(folder),
        "device": "cpu",
        "calibration": {"source": str(text_file), "samples": 8, "seqlen": 16, "seed": 0, "batch_size": 4},
        "passes": passes,
        "export": {"output": str(tmp_path / "run")},
        "evaluate": False,
    }
    data.update(overrides)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def test_plan_then_apply_reproduces_the_run(folder, text_file, tmp_path, one_thread):
    """A FLAP plan with a least-squares refit (a step artifact beside the plan file)."""
    passes = [{"flap": {"ratio": 0.4, "compensation": "least_squares"}}]
    recipe = write_recipe(tmp_path, folder, text_file, passes)
    result = runner.invoke(app, ["plan", str(recipe), "-o", str(tmp_path / "plans" / "mine.json")], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "decoder-linear params" in result.output and "removed" in result.output
    assert sorted(p.name for p in (tmp_path / "plans").iterdir()) == ["0-refit.safetensors", "mine.json"]
    assert not (tmp_path / "run").exists()  # nothing exported

    run = runner.invoke(app, ["run", str(recipe), "-q"], env=WIDE)
    assert run.exit_code == 0, run.output
    assert json.loads((tmp_path / "plans" / "mine.json").read_text()) == json.loads((tmp_path / "run" / "plan.json").read_text())
    replay = apply_plan_file(tmp_path / "plans" / "mine.json", str(folder), tmp_path / "applied", device="cpu",
                             progress=False, evaluate=False)
    assert replay.passed
    assert_same_safetensors(tmp_path / "run" / "model.safetensors", tmp_path / "applied" / "model.safetensors")


def test_calibration_free_recipe_plans_and_runs_without_a_corpus(folder, text_file, tmp_path, one_thread):
    recipe = write_recipe(tmp_path, folder, text_file, [{"magnitude_sp": {"ratio": 0.3}}], calibration=None)
    planned = runner.invoke(app, ["plan", str(recipe), "-o", str(tmp_path / "plan")], env=WIDE)
    assert planned.exit_code == 0, planned.output
    assert (tmp_path / "plan" / "plan.json").is_file()
    run = runner.invoke(app, ["run", str(recipe), "-q"], env=WIDE)
    assert run.exit_code == 0, run.output
    replay = apply_plan_file(tmp_path / "plan" / "plan.json", str(folder), tmp_path / "applied", device="cpu",
                             progress=False, evaluate=False)
    assert_same_safetensors(tmp_path / "run" / "model.safetensors", tmp_path / "applied" / "model.safetensors")
    assert "calibration data" not in {s["name"] for s in replay.report["stages"]}


def test_data_free_passes_never_read_the_calibration_text(folder, tmp_path, one_thread):
    """The recipe names a calibration file, which is gone by the time the data-free run starts."""
    text = tmp_path / "gone.txt"
    text.write_text("some text " * 200, encoding="utf-8")
    recipe = parse_recipe({"name": "tiny", "model": str(folder), "device": "cpu",
                           "calibration": {"source": str(text), "samples": 4, "seqlen": 16},
                           "passes": [{"magnitude_sp": {"ratio": 0.3}}], "export": {"output": str(tmp_path / "out")},
                           "evaluate": False}, "r.yaml")
    text.unlink()
    result = run_recipe(recipe, progress=False)
    assert result.passed
    assert "calibration data" not in {s["name"] for s in result.report["stages"]}


def test_a_pass_that_needs_data_is_refused_without_calibration(folder):
    with pytest.raises(RecipeError, match=r"r.yaml: passes\[0\]: flap needs calibration data"):
        parse_recipe({"model": str(folder), "calibration": None, "passes": [{"flap": {"ratio": 0.2}}]}, "r.yaml")


def test_out_of_core_plan_equals_the_in_memory_plan(folder, text_file, tmp_path, one_thread):
    recipe = write_recipe(tmp_path, folder, text_file, [{"wanda_sp": {"ratio": 0.3}}])
    for name, extra in (("mem.json", []), ("ooc.json", ["--max-memory", "16GiB"])):
        result = runner.invoke(app, ["plan", str(recipe), "-o", str(tmp_path / name), "-q", *extra], env=WIDE)
        assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "mem.json").read_text()) == json.loads((tmp_path / "ooc.json").read_text())


def test_plan_help_and_errors(tmp_path):
    result = runner.invoke(app, ["plan", "--help"], env=WIDE)
    assert result.exit_code == 0
    for word in ("--output", "--max-memory", "--offload-dir", "--device", "--quiet"):
        assert word in result.output
    missing = runner.invoke(app, ["plan", str(tmp_path / "nope.yaml"), "-o", str(tmp_path / "p.json")])
    assert missing.exit_code == 2 and "recipe file not found" in missing.output


def test_apply_out_of_core_replays_the_plan_bit_for_bit(folder, text_file, tmp_path, one_thread):
    recipe = write_recipe(tmp_path, folder, text_file, [{"flap": {"ratio": 0.4}}])
    assert runner.invoke(app, ["run", str(recipe), "-q"], env=WIDE).exit_code == 0
    result = runner.invoke(app, ["apply", str(tmp_path / "run" / "plan.json"), "--model", str(folder),
                                 "-o", str(tmp_path / "applied"), "--max-memory", "16GiB", "-q"], env=WIDE)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "applied" / "model.safetensors.index.json").is_file()
    from test_outofcore import assert_same_weights

    assert_same_weights(tmp_path / "run", tmp_path / "applied")
    assert json.loads((tmp_path / "applied" / "config.json").read_text()) == json.loads(
        (tmp_path / "run" / "config.json").read_text())


def test_plan_of_an_onnx_recipe_without_calibration_replays(tmp_path):
    """SPA with magnitude importance is data-free: no corpus, plan, then apply on the .onnx file."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from tests.test_spa import conv_model

    onnx.save(conv_model(), str(tmp_path / "model.onnx"))
    recipe = write_recipe(tmp_path, tmp_path / "model.onnx", None, [{"spa": {"ratio": 0.5, "importance": "magnitude"}}],
                          calibration=None)
    planned = runner.invoke(app, ["plan", str(recipe), "-o", str(tmp_path / "plan")], env=WIDE)
    assert planned.exit_code == 0, planned.output
    assert "groups" in planned.output
    assert runner.invoke(app, ["run", str(recipe), "-q"], env=WIDE).exit_code == 0
    applied = runner.invoke(app, ["apply", str(tmp_path / "plan" / "plan.json"), "--model", str(tmp_path / "model.onnx"),
                                  "-o", str(tmp_path / "applied"), "-q"], env=WIDE)
    assert applied.exit_code == 0, applied.output
    weights = [{i.name: numpy_helper.to_array(i) for i in onnx.load(str(folder / "model.onnx")).graph.initializer}
               for folder in (tmp_path / "run", tmp_path / "applied")]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        np.testing.assert_array_equal(weights[0][name], weights[1][name], err_msg=name)
