"""Pass declarations are light: listing the passes (``compress passes``) and reading their options
import neither torch, transformers nor onnx; each pass's implementation is imported when it runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from pydantic import BaseModel

from compress import registry

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "onnx")
ENTRIES = sorted(entry_points(group=registry.ENTRY_POINT_GROUP), key=lambda e: e.name)


def run_python(code: str) -> dict:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "COLUMNS": "250"})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_listing_the_passes_imports_no_heavy_module():
    found = run_python(
        "import json, sys, compress.registry as r; specs = r.available_passes(); "
        "print(json.dumps({'passes': sorted(specs), 'modules': sorted(sys.modules), "
        "'implementations': [s.implementation.partition(':')[0] for s in specs.values()]}))"
    )
    assert found["passes"] == sorted(e.name for e in ENTRIES)
    assert not [m for m in HEAVY if m in found["modules"]]
    assert not [m for m in found["implementations"] if m in found["modules"]], "an implementation was imported"


def test_the_passes_command_imports_no_heavy_module_and_lists_every_option():
    found = run_python(
        "import json, sys; from typer.testing import CliRunner; from compress.cli import app; "
        "result = CliRunner().invoke(app, ['passes'], env={'COLUMNS': '250'}); "
        "print(json.dumps({'code': result.exit_code, 'output': result.output, 'modules': sorted(sys.modules)}))"
    )
    assert found["code"] == 0, found["output"]
    assert not [m for m in HEAVY if m in found["modules"]]
    output = found["output"]
    for name, spec in registry.available_passes().items():
        assert name in output
        for option, field in spec.options.model_fields.items():
            assert (field.alias or option) in output, f"{name}.{option} is not listed"


def test_validating_a_recipe_imports_no_heavy_module():
    """The options of every pass in a recipe are checked against the declarations alone."""
    found = run_python(
        "import json, sys; from compress.recipe import load_recipe; "
        "names = [[e.name for e in load_recipe(p).passes] for p in "
        "('recipes/llama-flap-50.yaml', 'recipes/minilm-heads-25.yaml', 'recipes/onnx-spa-obs-20.yaml')]; "
        "print(json.dumps({'passes': names, 'modules': sorted(sys.modules)}))"
    )
    assert found["passes"] == [["flap"], ["heads"], ["spa"]]
    assert not [m for m in HEAVY if m in found["modules"]]


@pytest.mark.parametrize("entry", ENTRIES, ids=[e.name for e in ENTRIES])
def test_every_pass_implementation_loads_with_its_declaration(entry):
    entry.load()
    spec = registry.get_pass(entry.name)
    assert spec is not None and spec.name == entry.name
    assert isinstance(spec.implementation, str), "a built-in pass is declared apart from its implementation"
    cls = spec.cls
    assert cls.name == spec.name
    assert cls.Options is spec.options
    assert callable(getattr(cls, "run", None))
    assert tuple(getattr(cls, "kinds", ())) == spec.kinds and spec.kinds
    assert bool(getattr(cls, "needs_calibration", False)) == spec.needs_calibration
    assert bool(getattr(cls, "replays_details", False)) == spec.replays_details


def test_an_implementation_without_the_declared_options_is_refused(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", {})
    monkeypatch.setattr(registry, "_load_builtin_passes", lambda: None)

    @registry.register_pass("mismatched", implementation="compress.pruning.settings:PrunerSettings")
    class Mismatched:
        """A declaration whose implementation is not a pass."""

        class Options(BaseModel):
            pass

    spec = registry.get_pass("mismatched")
    assert spec.summary == "A declaration whose implementation is not a pass."
    with pytest.raises(TypeError, match="does not carry the Options"):
        spec.cls
