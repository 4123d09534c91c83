"""Every recipe under recipes/ is valid and describes itself with `compress run --dry-run`."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from compress.cli import app

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipe_parses_and_dry_runs(path, tmp_path):
    from compress.recipe import load_recipe

    assert load_recipe(path).name == path.stem
    result = CliRunner().invoke(app, ["run", str(path), "--dry-run", "-o", str(tmp_path / "out")],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "out").exists()
