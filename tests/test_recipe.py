"""Recipe schema: valid forms, defaults, and one clear message naming the YAML path of every bad field."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field

from compress import registry
from compress.errors import CompressError, RecipeError
from compress.recipe import (
    DEFAULT_MODEL,
    PassEntry,
    Recipe,
    RecipeValidationError,
    load_recipe,
    parse_recipe,
)


class ToyPrune:
    """Toy pruning pass for tests."""

    class Options(BaseModel):
        ratio: float = Field(0.5, gt=0, lt=1, description="Fraction to remove.")
        mode: Literal["uniform", "global"] = Field("uniform", description="Allocator.")
        min_heads: int = Field(1, ge=1, description="Heads every layer keeps.")


class ToyStrict:
    """Toy pass whose options forbid unknown keys themselves."""

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        scale: float = 1.0


@pytest.fixture(autouse=True)
def toy_registry(monkeypatch):
    """A registry holding only the toy passes (the built-in passes are not imported)."""
    monkeypatch.setattr(registry, "_REGISTRY", {})
    monkeypatch.setattr(registry, "_load_builtin_passes", lambda: None)
    registry.register_pass("toyprune")(ToyPrune)
    registry.register_pass("toystrict")(ToyStrict)


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(data: dict, source: str = "recipes/x.yaml") -> str:
    with pytest.raises(RecipeValidationError) as caught:
        parse_recipe(data, source)
    return str(caught.value)


# ------------------------------------------------------------------------------ valid recipes
def test_minimal_recipe_gets_documented_defaults():
    recipe = parse_recipe({}, "recipes/llama-flap-50.yaml")
    assert recipe.name == "llama-flap-50"
    assert recipe.model_source == DEFAULT_MODEL
    assert recipe.model_dtype == "float32" and recipe.model.dtype == "float32"
    assert recipe.device == "auto"
    assert recipe.calibration.source == "general" and recipe.calibration.samples == 256
    assert recipe.passes == []
    assert recipe.export.output == "outputs/llama-flap-50"
    assert recipe.output_dir == Path("outputs/llama-flap-50")
    assert recipe.export.formats == ["safetensors"]
    assert recipe.evaluate is not None and recipe.evaluate.datasets is None and recipe.evaluate.suite_name() == "v2"
    assert recipe.evaluate.sources() == ["austen:persuasion", "general:brown", "general:sotu", "general:wiki",
                                         "general:pydocs", "general:pycode", "general:chat"]
    assert recipe.validate.reload_max_abs_diff == pytest.approx(1e-4)
    assert recipe.source_name == "recipes/llama-flap-50.yaml"


def test_model_shorthand_and_mapping_forms_agree():
    short = parse_recipe({"model": "org/some-model"}, "a.yaml")
    mapped = parse_recipe({"model": {"source": "org/some-model"}}, "a.yaml")
    assert short.model == mapped.model


def test_model_dtype_overrides_top_level_dtype():
    recipe = parse_recipe({"dtype": "float16", "model": {"source": "m", "dtype": "bfloat16"}}, "a.yaml")
    assert recipe.model_dtype == "bfloat16"
    assert parse_recipe({"dtype": "float16", "model": "m"}, "a.yaml").model_dtype == "float16"


def test_pass_entry_forms():
    recipe = parse_recipe(
        {
            "passes": [
                {"toyprune": {"ratio": 0.3}},
                {"name": "toyprune", "ratio": 0.2, "mode": "global"},
                "toyprune",
                {"toyprune": None},
            ]
        },
        "a.yaml",
    )
    assert [entry.name for entry in recipe.passes] == ["toyprune"] * 4
    assert all(isinstance(entry, PassEntry) for entry in recipe.passes)
    assert isinstance(recipe.passes[0].options, ToyPrune.Options)
    assert recipe.passes[0].options.ratio == 0.3
    assert recipe.passes[1].options.mode == "global"
    assert recipe.passes[2].options == ToyPrune.Options()
    assert recipe.to_dict()["passes"][0] == {"toyprune": {"ratio": 0.3, "mode": "uniform", "min_heads": 1}}


def test_load_recipe_from_yaml_file(tmp_path):
    path = write(
        tmp_path,
        "name: demo\nmodel: smollm2-135m\ndevice: cpu\npasses:\n  - toyprune: {ratio: 0.5}\n"
        "export: {output: out/demo, formats: [safetensors]}\nevaluate: false\n",
    )
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    assert recipe.name == "demo" and recipe.device == "cpu"
    assert recipe.evaluate is None
    assert recipe.output_dir == Path("out/demo")


def test_with_overrides_replaces_output_and_device():
    recipe = parse_recipe({"device": "cpu"}, "a.yaml").with_overrides(output="elsewhere", device="cuda:1")
    assert recipe.output_dir == Path("elsewhere") and recipe.device == "cuda:1"
    assert recipe.source_name == "a.yaml"


# ------------------------------------------------------------------------------ errors
def test_unknown_top_level_key_names_it_and_lists_allowed_keys():
    message = problems_of({"colour": "red"})
    assert message.startswith("recipes/x.yaml: colour: unknown field")
    assert "passes" in message and "calibration" in message


def test_wrong_type_names_path_and_expected_type():
    message = problems_of({"seed": "abc", "calibration": {"samples": "many"}})
    assert "recipes/x.yaml: seed: must be a whole number (got 'abc')" in message
    assert "calibration.samples: must be a whole number (got 'many')" in message


def test_ratio_out_of_range_inside_a_pass():
    message = problems_of({"passes": [{"toyprune": {"ratio": 1.5}}]})
    assert message == "recipes/x.yaml: passes[0].toyprune.ratio: must be > 0 and < 1 (got 1.5)"


def test_named_form_option_path():
    message = problems_of({"passes": [{"name": "toyprune", "ratio": -1}]})
    assert "passes[0].ratio: must be > 0 and < 1 (got -1)" in message


def test_literal_option_lists_allowed_values():
    message = problems_of({"passes": [{"toyprune": {"mode": "local"}}], "dtype": "fp8"})
    assert "passes[0].toyprune.mode: must be one of: uniform, global (got 'local')" in message
    assert "dtype: must be one of: float32, float16, bfloat16 (got 'fp8')" in message


def test_unknown_option_of_a_pass_lists_its_options():
    for pass_name in ("toyprune", "toystrict"):
        message = problems_of({"passes": [{pass_name: {"ratoi": 0.5}}]})
        assert f"passes[0].{pass_name}.ratoi: unknown" in message


def test_unknown_pass_lists_available_names():
    message = problems_of({"passes": [{"toyprun": {}}]})
    assert "passes[0]: unknown pass 'toyprun'" in message
    assert "did you mean 'toyprune'" in message
    assert "available passes: toyprune, toystrict" in message


def test_malformed_pass_entries():
    message = problems_of({"passes": [{"a": {}, "b": {}}, {"toyprune": [1, 2]}, 7]})
    assert "passes[0]: must be a one-key mapping" in message
    assert "passes[1].toyprune: options must be a mapping" in message
    assert "passes[2]: must be a one-key mapping" in message
    assert "passes: must be a list" in problems_of({"passes": {"toyprune": {}}})


def test_device_export_and_text_source_checks():
    message = problems_of(
        {
            "device": "gpu",
            "export": {"formats": ["safetensors", "onnx", "tflite"]},
            "evaluate": {"datasets": ["austen:persuation", "no/such/file.txt"]},
        }
    )
    assert "device: must be auto, cpu, cuda or cuda:N (got 'gpu')" in message
    assert "export.formats[1]" not in message  # onnx is a valid format
    assert "export.formats[2]: unknown export format 'tflite'" in message
    assert "evaluate.datasets[0]: unknown Austen text 'austen:persuation'" in message
    assert "austen:persuasion" in message  # the allowed names are listed
    assert "evaluate.datasets[1]: no such file or folder 'no/such/file.txt'" in message


def test_model_of_wrong_shape():
    message = problems_of({"model": 5})
    assert message.startswith("recipes/x.yaml: model: must be a model source")
    assert "model.dtype: must be one of" in problems_of({"model": {"source": "m", "dtype": "int8"}})


def test_gates_need_the_measurements_they_check():
    message = problems_of({"evaluate": None, "validate": {"max_ppl_ratio": 1.5, "min_top1_agreement": 0.5}})
    assert "validate.max_ppl_ratio: needs the dense perplexity" in message
    assert "validate.min_top1_agreement: needs evaluate.agreement: true" in message


def test_every_problem_in_one_message_in_document_order():
    data = {
        "seed": -1,
        "passes": [{"toyprune": {"ratio": 2}}, {"nope": {}}],
        "device": "tpu",
        "calibration": {"seqlen": 0},
    }
    with pytest.raises(RecipeValidationError) as caught:
        parse_recipe(data, "recipes/x.yaml")
    paths = [problem.path for problem in caught.value.problems]
    assert paths == ["seed", "passes[0].toyprune.ratio", "passes[1]", "device", "calibration.seqlen"]
    lines = str(caught.value).splitlines()
    assert len(lines) == 5 and all(line.startswith("recipes/x.yaml: ") for line in lines)


def test_recipe_error_is_a_user_error_with_exit_code_2():
    with pytest.raises(RecipeError) as caught:
        parse_recipe({"seed": "x"}, "a.yaml")
    assert isinstance(caught.value, CompressError) and caught.value.exit_code == 2


def test_not_a_mapping_and_empty(tmp_path):
    assert "a recipe is a YAML mapping" in problems_of([1, 2])
    with pytest.raises(RecipeError, match="empty"):
        load_recipe(write(tmp_path, "# nothing here\n"))


def test_bad_yaml_syntax_names_file_and_line(tmp_path):
    path = write(tmp_path, "model: smollm2-135m\npasses:\n  - toyprune: {ratio: 0.5\ndevice: cpu\n")
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: line ")
    assert "invalid YAML" in message


def test_bad_yaml_indentation_reports_its_line(tmp_path):
    path = write(tmp_path, "model: m\n  device: cpu\nseed: 0\n")
    with pytest.raises(RecipeError, match=r"line 2, column \d+: invalid YAML"):
        load_recipe(path)


def test_duplicate_key_is_an_error(tmp_path):
    path = write(tmp_path, "seed: 1\ndevice: cpu\nseed: 2\n")
    with pytest.raises(RecipeError, match=r"line 3.*duplicate key 'seed' \(first written on line 1\)"):
        load_recipe(path)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found: .*nope.yaml"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="is a folder"):
        load_recipe(tmp_path)
