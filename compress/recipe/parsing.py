"""A parsed recipe mapping to a validated :class:`~compress.recipe.schema.Recipe`: the sections
checked by the schema, the passes by :mod:`compress.recipe.pass_list`, the gates against the
evaluation they need, and every problem raised together, in the order of the file, as one
:class:`~compress.recipe.problems.RecipeValidationError`."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from compress.recipe.explain import problems_from
from compress.recipe.fields import default_run_name
from compress.recipe.pass_list import PassListParser, pass_problems
from compress.recipe.problems import RecipeProblem, RecipeValidationError, show_value
from compress.recipe.schema import Recipe


def _cross_field_problems(recipe: Recipe) -> list[RecipeProblem]:
    """Gates that need measurements the ``evaluate`` section turns off."""
    problems = []
    gates = recipe.validate
    evaluate = recipe.evaluate
    for gate in ("max_ppl_ratio", "max_geomean_ppl_ratio"):
        if getattr(gates, gate) is not None and (evaluate is None or not evaluate.dense):
            problems.append(RecipeProblem(("validate", gate), "needs the dense perplexity: keep evaluate on and set "
                                          "evaluate.dense: true"))
    for gate in ("min_top1_agreement", "max_mean_kl"):
        if getattr(gates, gate) is not None and (evaluate is None or not evaluate.agreement or not evaluate.dense):
            problems.append(
                RecipeProblem(("validate", gate), "needs evaluate.agreement: true and evaluate.dense: true (and "
                              "evaluate on)")
            )
    return problems


def _document_order(data: dict, problems: list[RecipeProblem]) -> list[RecipeProblem]:
    """Sort problems by where their top-level key sits in the file (stable within one key)."""
    keys = list(data)

    def position(problem: RecipeProblem) -> int:
        head = problem.loc[0] if problem.loc else None
        return keys.index(head) if head in keys else len(keys)

    return sorted(problems, key=position)


def parse_recipe(data: Any, source_name: str = "<recipe>") -> Recipe:
    """Validate an already-parsed recipe mapping; raise :class:`RecipeValidationError` listing every problem."""
    if not isinstance(data, dict):
        what = "empty" if data is None else f"{show_value(data)}, not a mapping"
        raise RecipeValidationError(
            source_name, [RecipeProblem((), f"a recipe is a YAML mapping of fields (this one is {what})")]
        )
    body = {key: value for key, value in data.items() if key != "passes"}
    body.setdefault("name", default_run_name(source_name))
    problems: list[RecipeProblem] = []
    recipe: Recipe | None = None
    try:
        recipe = Recipe.model_validate(body)
    except ValidationError as error:
        problems.extend(problems_from(error, Recipe))
    pass_list = PassListParser().parse(data.get("passes"))
    problems.extend(pass_list.problems)
    if recipe is not None:
        problems.extend(_cross_field_problems(recipe))
        problems.extend(pass_problems(recipe, pass_list.entries))
    if problems:
        raise RecipeValidationError(source_name, _document_order(data, problems))
    assert recipe is not None
    recipe = recipe.model_copy(
        update={
            "passes": pass_list.entries,
            "model": recipe.model.model_copy(update={"dtype": recipe.model_dtype}),
            "export": recipe.export.model_copy(update={"output": str(recipe.output_dir)}),
        }
    )
    recipe.set_source_name(source_name)
    return recipe
