"""The ``passes`` list of a recipe: each entry validated against the ``Options`` model of the pass
registered under its name (:mod:`compress.registry`), every problem collected with its YAML path;
and the checks of passes against the rest of the recipe (calibration turned off, out of core)."""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import ValidationError

from compress import registry
from compress.recipe.explain import field_keys, problems_from
from compress.recipe.problems import RecipeProblem, show_value
from compress.recipe.schema import PassEntry, Recipe


class PassListParser:
    """Validates the raw ``passes`` list against the pass registry, collecting every problem.

    Accepted entry forms (``i`` is the entry's index):
      * ``{flap: {ratio: 0.5}}`` — one key, the pass name; options at ``passes[i].flap.<option>``;
      * ``{flap: null}`` or the bare string ``flap`` — the pass with default options;
      * ``{name: flap, ratio: 0.5}`` — options beside ``name``, at ``passes[i].<option>``.
    """

    def __init__(self) -> None:
        self.entries: list[PassEntry] = []
        self.problems: list[RecipeProblem] = []

    def parse(self, raw_passes: Any) -> "PassListParser":
        if raw_passes is None:
            return self
        if not isinstance(raw_passes, list):
            self._problem(("passes",), f"must be a list of passes (got {show_value(raw_passes)})")
            return self
        for index, raw_entry in enumerate(raw_passes):
            self._parse_entry(index, raw_entry)
        return self

    def _problem(self, loc: tuple, message: str) -> None:
        self.problems.append(RecipeProblem(loc=loc, message=message))

    def _parse_entry(self, index: int, raw_entry: Any) -> None:
        here: tuple = ("passes", index)
        if isinstance(raw_entry, str):
            name, options, options_loc = raw_entry, {}, here
        elif isinstance(raw_entry, dict) and "name" in raw_entry:
            options = {k: v for k, v in raw_entry.items() if k != "name"}
            name, options_loc = raw_entry["name"], here
            if not isinstance(name, str):
                self._problem(here + ("name",), f"must be a pass name (got {show_value(name)})")
                return
        elif isinstance(raw_entry, dict) and len(raw_entry) == 1:
            name, options = next(iter(raw_entry.items()))
            options_loc = here + (str(name),)
            if options is None:
                options = {}
            if not isinstance(options, dict):
                self._problem(options_loc, f"options must be a mapping of option: value (got {show_value(options)})")
                return
        else:
            if isinstance(raw_entry, dict):
                shape = f"a mapping with keys {', '.join(map(str, raw_entry))}"
            else:
                shape = show_value(raw_entry)
            self._problem(
                here,
                f"must be a one-key mapping {{pass_name: {{options}}}}, a mapping with name: and options, "
                f"or a pass name (got {shape})",
            )
            return
        self._validate_options(here, str(name), options, options_loc)

    def _validate_options(self, here: tuple, name: str, options: dict, options_loc: tuple) -> None:
        spec = registry.get_pass(name)
        if spec is None:
            self._problem(here, unknown_pass_message(name, list(registry.available_passes())))
            return
        options_model = spec.options
        if options_model.model_config.get("extra") != "allow":
            known = set(field_keys(options_model)) | set(options_model.model_fields)
            unknown = [key for key in options if key not in known]
            allowed = ", ".join(field_keys(options_model)) or "(this pass has no options)"
            for key in unknown:
                self._problem(options_loc + (str(key),), f"unknown option of pass {name}; allowed: {allowed}")
            options = {k: v for k, v in options.items() if k not in unknown}
        try:
            instance = options_model.model_validate(options)
        except ValidationError as error:
            self.problems.extend(problems_from(error, options_model, options_loc))
            return
        self.entries.append(PassEntry(name=name, options=instance))


def unknown_pass_message(name: str, available: list[str]) -> str:
    """``unknown pass 'flpa' (did you mean 'flap'?); available passes: cfsp, flap``."""
    if not available:
        return f"unknown pass {show_value(name)}; no passes are registered"
    close = difflib.get_close_matches(name, available, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown pass {show_value(name)}{hint}; available passes: {', '.join(available)}"


def pass_problems(recipe: Recipe, entries: list[PassEntry]) -> list[RecipeProblem]:
    """Passes that need what the recipe turns off: calibration data (``calibration: null``), or
    the whole model in memory (``max_memory``: see :func:`compress.outofcore.out_of_core_problems`)."""
    problems = []
    if recipe.calibration is None:
        for index, entry in enumerate(entries):
            if registry.get_pass(entry.name).needs_calibration:
                problems.append(RecipeProblem(("passes", index), f"{entry.name} needs calibration data, but the "
                                              "recipe has `calibration: null`; add a calibration section"))
    if recipe.offload_dir is not None and recipe.max_memory is None:
        problems.append(RecipeProblem(("offload_dir",), "only used out of core: set max_memory too"))
    if recipe.max_memory is not None:
        from compress.outofcore import out_of_core_problems  # imports torch: only for an out-of-core recipe

        problems.extend(RecipeProblem(loc, message) for loc, message in out_of_core_problems(recipe, entries))
    return problems
