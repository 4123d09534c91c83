"""Recipe files: read with a size limit (a larger file is refused before it is parsed), parsed as
YAML by a safe loader that refuses duplicate keys and names the line and column of a syntax
error, then validated (:func:`~compress.recipe.parsing.parse_recipe`). Every failure is a
:class:`~compress.errors.RecipeError` naming the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from compress.errors import RecipeError
from compress.recipe.parsing import parse_recipe
from compress.recipe.schema import Recipe

MAX_RECIPE_BYTES = 1 << 20  # a recipe is a page of YAML; a larger file is refused before it is parsed


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe YAML loader that refuses a key written twice in one mapping."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    first_line: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            seen = key in first_line
        except TypeError:  # unhashable key: let the stock constructor report it
            continue
        if seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first written on line {first_line[key]})", key_node.start_mark
            )
        first_line[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def parse_yaml(text: str, source_name: str) -> Any:
    """Parse YAML text; a syntax error becomes a RecipeError naming the file, line and column."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = error.problem or error.context or "unreadable"
        raise RecipeError(f"{source_name}: {where}invalid YAML: {problem}") from None
    except yaml.YAMLError as error:
        raise RecipeError(f"{source_name}: invalid YAML: {error}") from None
    except RecursionError:
        raise RecipeError(f"{source_name}: the YAML is nested too deeply to be a recipe") from None


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file. Every failure is a RecipeError naming the file."""
    path = Path(path)
    if not path.exists():
        raise RecipeError(f"recipe file not found: {path}")
    if path.is_dir():
        raise RecipeError(f"{path}: is a folder; give the path of a recipe .yaml file")
    try:
        size = path.stat().st_size
    except OSError as error:
        raise RecipeError(f"{path}: cannot be read ({error.strerror or error})") from None
    if size > MAX_RECIPE_BYTES:
        raise RecipeError(f"{path}: {size:,} bytes is too large for a recipe (at most {MAX_RECIPE_BYTES:,}); "
                          "a recipe names its data, it does not hold it")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not UTF-8 text; a recipe is a YAML file") from None
    except OSError as error:
        raise RecipeError(f"{path}: cannot be read ({error.strerror or error})") from None
    data = parse_yaml(text, str(path))
    try:
        return parse_recipe(data, str(path))
    except RecursionError:
        raise RecipeError(f"{path}: the recipe is nested too deeply") from None
