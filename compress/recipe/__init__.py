"""Recipes: the YAML file that says which model to compress, with which passes, and how to check it.

A recipe is parsed into a :class:`Recipe` (pydantic, every model forbids unknown fields). Each
entry of ``passes`` is validated against the ``Options`` model of the pass registered under that
name (:mod:`compress.registry`), so a bad option is reported before anything heavy runs.

A recipe that does not validate raises one :class:`RecipeValidationError` (a
:class:`~compress.errors.RecipeError`) whose message lists every bad field by its YAML path and
says what is allowed::

    recipes/x.yaml: passes[0].flap.ratio: must be > 0 and < 1 (got 1.5)
    recipes/x.yaml: device: must be auto, cpu, cuda or cuda:N (got 'gpu')

The package, by job: :mod:`~compress.recipe.fields` (defaults and single-value checks),
:mod:`~compress.recipe.schema` (the pydantic sections and :class:`Recipe`),
:mod:`~compress.recipe.problems` (how a bad field is reported), :mod:`~compress.recipe.explain`
(pydantic errors and bounds in words), :mod:`~compress.recipe.pass_list` (the ``passes`` list
against the registry), :mod:`~compress.recipe.parsing` (a mapping to a Recipe) and
:mod:`~compress.recipe.loading` (a YAML file to a Recipe).

Relative paths in a recipe (``export.output``, a local model folder or ``.gguf`` file, a local
text file or folder) are kept as written and resolve against the current working directory of the
process that runs the recipe, not against the recipe file's folder.
"""

from __future__ import annotations

from compress.devices import resolve_device
from compress.recipe.explain import describe_bounds, explain_error, field_keys, literal_choices, problems_from
from compress.recipe.fields import (
    AUSTEN_PREFIX,
    DEFAULT_GENERATION_PROMPTS,
    DEFAULT_MODEL,
    EXPORT_FORMATS_AVAILABLE,
    EXPORT_FORMATS_PLANNED,
    IMAGE_SOURCES,
    DType,
    ExportFormat,
    TextSource,
    austen_text_names,
    check_run_name,
    check_text_source,
    general_text_names,
    normalize_device,
)
from compress.recipe.loading import MAX_RECIPE_BYTES, load_recipe, parse_yaml
from compress.recipe.parsing import parse_recipe
from compress.recipe.pass_list import PassListParser, pass_problems, unknown_pass_message
from compress.recipe.problems import RecipeProblem, RecipeValidationError, show_value, yaml_path
from compress.recipe.schema import (
    CalibrationSpec,
    EvaluateSpec,
    ExportSpec,
    ModelSpec,
    OnnxSpec,
    PassEntry,
    Recipe,
    StrictSection,
    ValidateSpec,
)

__all__ = [
    "AUSTEN_PREFIX",
    "DEFAULT_GENERATION_PROMPTS",
    "DEFAULT_MODEL",
    "EXPORT_FORMATS_AVAILABLE",
    "EXPORT_FORMATS_PLANNED",
    "IMAGE_SOURCES",
    "MAX_RECIPE_BYTES",
    "CalibrationSpec",
    "DType",
    "EvaluateSpec",
    "ExportFormat",
    "ExportSpec",
    "ModelSpec",
    "OnnxSpec",
    "PassEntry",
    "PassListParser",
    "Recipe",
    "RecipeProblem",
    "RecipeValidationError",
    "StrictSection",
    "TextSource",
    "ValidateSpec",
    "austen_text_names",
    "check_run_name",
    "check_text_source",
    "describe_bounds",
    "explain_error",
    "field_keys",
    "general_text_names",
    "literal_choices",
    "load_recipe",
    "normalize_device",
    "parse_recipe",
    "parse_yaml",
    "pass_problems",
    "problems_from",
    "resolve_device",
    "show_value",
    "unknown_pass_message",
    "yaml_path",
]
