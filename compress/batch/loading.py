"""Reading a batch file: validated against :mod:`compress.batch.spec`, its recipes loaded once,
overrides merged, the grid expanded (models × passes × ratios), every job named uniquely and its
recipe validated; every problem collected with its YAML path and raised together as one
:class:`~compress.recipe.problems.RecipeValidationError`."""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Optional

from pydantic import ValidationError

from compress import registry
from compress.batch.jobs import Batch, BatchJob
from compress.batch.spec import BatchSpec, GridSpec, JobEntrySpec, Resources
from compress.errors import RecipeError
from compress.recipe.explain import problems_from
from compress.recipe.fields import DEFAULT_MODEL
from compress.recipe.loading import load_recipe, parse_yaml
from compress.recipe.parsing import parse_recipe
from compress.recipe.pass_list import PassListParser
from compress.recipe.problems import RecipeProblem, RecipeValidationError, show_value
from compress.recipe.schema import Recipe


def deep_merge(base: dict, overrides: dict) -> dict:
    """A copy of ``base`` with ``overrides`` applied: mappings merge key by key, anything else replaces."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def safe_name(text: str) -> str:
    """``HuggingFaceTB/SmolLM2 135M`` -> ``huggingfacetb-smollm2-135m``: lower case, runs of other
    characters than letters, digits, ``._+-`` made one ``-``, at most 100 characters."""
    cleaned = re.sub(r"[^a-z0-9._+-]+", "-", text.lower()).strip("-._+")
    return cleaned[:100].rstrip("-._+") or "job"


def model_slug(source: str) -> str:
    """The last part of a model source without its extension: ``/data/tiny.gguf`` -> ``tiny``,
    ``HuggingFaceTB/SmolLM2-135M`` -> ``smollm2-135m``."""
    tail = source.rstrip("/\\").replace("\\", "/").split("/")[-1]
    for suffix in (".gguf", ".onnx"):
        if tail.lower().endswith(suffix):
            tail = tail[: -len(suffix)]
    return safe_name(tail)


class SourceRecipe(NamedTuple):
    """A recipe file read once: validated (for its name and errors) and as written (the base that
    overrides are merged into, so e.g. a top-level dtype override still reaches the model)."""

    recipe: Recipe
    data: dict


@dataclass
class _Draft:
    """A job before naming: the name it asks for (explicit or derived), its recipe data, where it came from."""

    wanted_name: str
    explicit: bool
    data: dict
    loc: tuple
    origin: str
    resources: Resources


class BatchLoader:
    """Reads and validates a batch file and expands it into :class:`Batch`; collects every problem
    (with its YAML path) and raises them together as one RecipeValidationError."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.label = str(path)
        self.problems: list[RecipeProblem] = []
        self._recipes: dict[Path, SourceRecipe] = {}

    def load(self) -> Batch:
        spec = self._spec(self._read())
        defaults = Resources().updated(spec.resources)
        drafts = [draft for i, entry in enumerate(spec.jobs) if (draft := self._job_draft(i, entry, defaults))]
        if spec.grid is not None:
            drafts += self._grid_drafts(spec.grid, defaults)
        if not spec.jobs and spec.grid is None:
            self._problem((), "a batch file needs jobs: (a list of recipes) or grid: (a base recipe and axes)")
        self._raise_problems()
        output_root = Path(spec.output) if spec.output else Path("outputs") / safe_name(self.path.stem)
        jobs = self._named_jobs(drafts, output_root)
        self._raise_problems()
        return Batch(source=self.path, output_root=output_root, executor=spec.executor, workers=spec.workers,
                     address=spec.address, retries=spec.retries, jobs=tuple(jobs))

    # ------------------------------------------------------------------ reading
    def _read(self) -> Any:
        if not self.path.exists():
            raise RecipeError(f"batch file not found: {self.path}")
        if self.path.is_dir():
            raise RecipeError(f"{self.path}: is a folder; give the path of a batch .yaml file")
        try:
            text = self.path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise RecipeError(f"{self.path}: not UTF-8 text; a batch file is a YAML file") from None
        except OSError as error:
            raise RecipeError(f"{self.path}: cannot be read ({error.strerror or error})") from None
        return parse_yaml(text, self.label)

    def _spec(self, data: Any) -> BatchSpec:
        if not isinstance(data, dict):
            what = "empty" if data is None else f"{show_value(data)}, not a mapping"
            raise RecipeValidationError(self.label, [RecipeProblem((), f"a batch file is a YAML mapping (this one is {what})")])
        try:
            return BatchSpec.model_validate(data)
        except ValidationError as error:
            raise RecipeValidationError(self.label, problems_from(error, BatchSpec)) from None

    def _problem(self, loc: tuple, message: str) -> None:
        self.problems.append(RecipeProblem(loc=loc, message=message))

    def _raise_problems(self) -> None:
        if self.problems:
            raise RecipeValidationError(self.label, self.problems)

    def _recipe(self, relative: str, loc: tuple) -> Optional[SourceRecipe]:
        """The recipe at ``relative`` (to the batch file), loaded once; None (and a problem) if it does not load."""
        path = self.path.parent / relative
        if path not in self._recipes:
            if not path.is_file():
                self._problem(loc, f"recipe file not found: {path} (paths are relative to the batch file)")
                return None
            try:
                recipe = load_recipe(path)
            except RecipeError as error:
                for line in str(error).splitlines():
                    self._problem(loc, line)
                return None
            self._recipes[path] = SourceRecipe(recipe, parse_yaml(path.read_text(encoding="utf-8"), str(path)))
        return self._recipes[path]

    def _override_problems(self, overrides: dict, loc: tuple) -> bool:
        """Record overrides of the fields the batch sets itself; True when there were none."""
        clean = True
        if "name" in overrides:
            self._problem(loc + ("name",), "set by the batch; give the job a name with name: instead")
            clean = False
        export = overrides.get("export")
        if isinstance(export, dict) and "output" in export:
            self._problem(loc + ("export", "output"), "set by the batch: every job writes to <output>/<job name>")
            clean = False
        return clean

    # ------------------------------------------------------------------ jobs:
    def _job_draft(self, index: int, entry: JobEntrySpec, defaults: Resources) -> Optional[_Draft]:
        loc = ("jobs", index)
        source = self._recipe(entry.recipe, loc + ("recipe",))
        if source is None or not self._override_problems(entry.overrides, loc + ("overrides",)):
            return None
        return _Draft(wanted_name=entry.name or safe_name(source.recipe.name), explicit=entry.name is not None,
                      data=deep_merge(source.data, entry.overrides), loc=loc,
                      origin=f"jobs[{index}] {entry.recipe}", resources=defaults.updated(entry.resources))

    # ------------------------------------------------------------------ grid:
    def _grid_drafts(self, grid: GridSpec, defaults: Resources) -> list[_Draft]:
        source = self._recipe(grid.base, ("grid", "base"))
        if source is None or not self._override_problems(grid.overrides, ("grid", "overrides")):
            return []
        start = deep_merge(source.data, grid.overrides)
        if grid.passes is not None:
            pass_lists = [self._pass_list(item, ("grid", "passes", i), grid.ratios) for i, item in enumerate(grid.passes)]
        else:
            pass_lists = [self._pass_list(start.get("passes") or [], ("grid", "base", "passes"), grid.ratios)]
        if any(passes is None for passes in pass_lists):
            return []
        if grid.ratios:
            for i, passes in enumerate(pass_lists):
                if not any("ratio" in options for entry in passes for options in entry.values()):
                    where = ("grid", "passes", i) if grid.passes is not None else ("grid", "base")
                    self._problem(where, "none of these passes has a ratio option, but grid.ratios is set")
        models = grid.models or [_model_source(start.get("model"))]
        ratios: list[Optional[float]] = list(grid.ratios) if grid.ratios else [None]
        resources = defaults.updated(grid.resources)
        drafts = []
        for model, passes, ratio in itertools.product(models, pass_lists, ratios):
            data = dict(start)
            if grid.models:
                data["model"] = {**start["model"], "source": model} if isinstance(start.get("model"), dict) else model
            data["passes"] = [_with_ratio(entry, ratio) for entry in passes]
            passes_slug = "+".join(next(iter(entry)) for entry in passes) or "dense"
            name = f"{model_slug(model)}-{passes_slug}" + (f"-r{ratio:g}" if ratio is not None else "")
            described = f"model {model}, passes {passes_slug}" + (f", ratio {ratio:g}" if ratio is not None else "")
            drafts.append(_Draft(wanted_name=safe_name(name), explicit=False, data=data, loc=("grid",),
                                 origin=f"grid ({described})", resources=resources))
        return drafts

    def _pass_list(self, item: Any, here: tuple, ratios: Optional[list[float]]) -> Optional[list[dict]]:
        """A grid pass item (a pass name, one pass, or a pass list) as a validated pass list in
        one-key form; None when it is bad (the problems are recorded under ``here``). Passes that
        require a ratio are validated with the grid's first ratio."""
        if isinstance(item, list) and not item and here[1] == "passes":
            self._problem(here, "an empty pass list; name at least one pass")
            return None
        raw_list = item if isinstance(item, list) else [item]
        if ratios:
            raw_list = [_raw_with_ratio(raw, ratios[0]) for raw in raw_list]
        parsed = PassListParser().parse(raw_list)
        for problem in parsed.problems:
            inner = problem.loc[1:] if isinstance(item, list) else problem.loc[2:]  # drop ("passes", j)
            self.problems.append(RecipeProblem(loc=here + tuple(inner), message=problem.message))
        if parsed.problems:
            return None
        return [{entry.name: entry.options_dict()} for entry in parsed.entries]

    # ------------------------------------------------------------------ naming
    def _named_jobs(self, drafts: list[_Draft], output_root: Path) -> list[BatchJob]:
        """Give every draft a unique name (explicit names first; a derived name that clashes gets
        ``-2``, ``-3``…), point it at its folder, and validate its recipe."""
        taken: dict[str, str] = {}
        for draft in drafts:
            if draft.explicit:
                if draft.wanted_name in taken:
                    self._problem(draft.loc + ("name",), f"job name '{draft.wanted_name}' is already used by "
                                                         f"{taken[draft.wanted_name]}")
                taken.setdefault(draft.wanted_name, draft.origin)
        names = []
        for draft in drafts:
            name = draft.wanted_name
            if not draft.explicit:
                suffix = 2
                while name in taken:
                    name, suffix = f"{draft.wanted_name}-{suffix}", suffix + 1
                taken[name] = draft.origin
            names.append(name)
        jobs = []
        for draft, name in zip(drafts, names):
            data = deep_merge(draft.data, {"name": name, "export": {"output": str(output_root / name)}})
            try:
                recipe = parse_recipe(data, f"{self.label} job {name}")
            except RecipeValidationError as error:
                for problem in error.problems:
                    self._problem(draft.loc, f"job {name} ({draft.origin}): {problem.path}: {problem.message}")
                continue
            jobs.append(BatchJob(name=name, recipe=recipe, origin=draft.origin, resources=draft.resources))
        return jobs


def _raw_with_ratio(raw: Any, ratio: float) -> Any:
    """A pass entry as written (a name, ``{name: options}`` or ``{name: x, ...}``) with ``ratio`` added
    when its pass has a ratio option and the entry does not set one; anything else is returned as is."""
    if isinstance(raw, str):
        name, options = raw, {}
    elif isinstance(raw, dict) and "name" in raw:
        name, options = raw["name"], raw
    elif isinstance(raw, dict) and len(raw) == 1:
        (name, options), = raw.items()
        options = {} if options is None else options
    else:
        return raw
    spec = registry.get_pass(name) if isinstance(name, str) else None
    if spec is None or "ratio" not in spec.options.model_fields or not isinstance(options, dict) or "ratio" in options:
        return raw
    if isinstance(raw, dict) and "name" in raw:
        return {**raw, "ratio": ratio}
    return {name: {**options, "ratio": ratio}}


def _model_source(model: Any) -> str:
    """The source of a recipe's ``model`` value as written: shorthand string, mapping, or absent."""
    if isinstance(model, dict):
        return str(model.get("source") or DEFAULT_MODEL)
    return str(model) if model else DEFAULT_MODEL


def _with_ratio(entry: dict, ratio: Optional[float]) -> dict:
    """A one-key pass entry with its ``ratio`` option set to ``ratio`` (when it has one and ratio is given)."""
    (name, options), = entry.items()
    if ratio is None or "ratio" not in options:
        return {name: dict(options)}
    return {name: {**options, "ratio": ratio}}


def load_batch(path: str | Path) -> Batch:
    """Read, validate and expand a batch file. Every problem is a RecipeError naming the file (and field)."""
    return BatchLoader(Path(path)).load()
