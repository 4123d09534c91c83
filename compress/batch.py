"""Batch runs: many recipes from one batch file (``compress batch jobs.yaml``).

A batch file lists recipe jobs and/or a grid built from a base recipe, where their folders go, and
how to run them (see docs/batch.md)::

    output: outputs/sweep          # root folder; job NAME writes to outputs/sweep/NAME
    executor: local                # local (worker processes) or ray (Ray tasks)
    workers: 2                     # local: jobs at once, one spawned process each
    retries: 1                     # a job that raises is run again this many times
    resources: {cpus: 4, gpus: 1, memory: 16GiB}   # per job, used by ray (jobs and grid may override)
    jobs:
      - recipe: llama-flap-20.yaml               # relative to the batch file
        name: flap-20-short                      # default: the recipe's name
        overrides: {evaluate: {max_windows: 32}} # merged into the recipe (mappings merge, the rest replaces)
    grid:
      base: llama-flap-20.yaml     # every grid job starts from this recipe (relative to the batch file)
      models: [smollm2-135m]       # each replaces model.source
      passes: [magnitude_sp, [flap, lora_recover]]   # each replaces passes: a pass name or a pass list
      ratios: [0.2, 0.5]           # each sets the ratio option of every pass that has one
      overrides: {}                # merged into every grid job before the axes are applied

Grid jobs are expanded model by model, then pass list by pass list, then ratio by ratio, and named
``<model>-<pass>+<pass>-r<ratio>`` (lower case, filesystem-safe; a clash gets ``-2``, ``-3``).

A job whose folder already holds a report.json of a run that passed its gates, made from the same
recipe (the folder's recipe.yaml), is skipped. A job that raises is retried ``retries`` times in a
fresh process; one whose gates fail is not retried. Failed jobs never stop the others. The batch
writes ``results.json``, ``results.csv`` and ``results.md`` into its output root.

Every problem in a batch file is a :class:`~compress.recipe.RecipeValidationError` naming the file
and the YAML path of the field, like a recipe's.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
import os
import re
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, NamedTuple, Optional, Protocol

from pydantic import ByteSize, Field, ValidationError, field_validator

from compress.errors import CompressError, RecipeError
from compress.recipe import (
    DEFAULT_MODEL,
    EvaluateSpec,
    PassListParser,
    Recipe,
    RecipeProblem,
    RecipeValidationError,
    _Strict,
    load_recipe,
    parse_recipe,
    parse_yaml,
    problems_from,
    show_value,
)
from compress.report import REPORT_JSON

PASSED, SKIPPED, GATE_FAILED, FAILED = "passed", "skipped", "gate_failed", "failed"
OK_STATUSES = (PASSED, SKIPPED)
RESULTS_JSON, RESULTS_CSV, RESULTS_MD = "results.json", "results.csv", "results.md"
JOB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,99}$")
RAY_MISSING = 'executor: ray needs `pip install ray` (or `pip install -e ".[ray]"`)'


# ----------------------------------------------------------------------------------- schema
def _check_job_name(value: str) -> str:
    """``value`` when it can name a folder on any filesystem; ValueError otherwise."""
    if not JOB_NAME.match(value):
        raise ValueError(
            f"must be a folder-safe name: letters, digits, '.', '_', '+', '-', starting with a letter or digit, "
            f"at most 100 characters (got {show_value(value)})"
        )
    return value


Ratio = Annotated[float, Field(gt=0, lt=1)]


class ResourcesSpec(_Strict):
    """What one job asks the Ray scheduler for; an unset field keeps the value from the level above."""

    cpus: Optional[float] = Field(None, gt=0, description="CPU cores per job (default 1).")
    gpus: Optional[float] = Field(None, ge=0, description="GPUs per job, fractions allowed (default 0).")
    memory: Optional[ByteSize] = Field(None, gt=0, description="Memory per job: bytes or e.g. 16GiB (default: none).")


@dataclass(frozen=True)
class Resources:
    """The resolved resources of one job: CPU cores, GPUs, and memory in bytes (None: no reservation)."""

    cpus: float = 1.0
    gpus: float = 0.0
    memory: Optional[int] = None

    def updated(self, spec: Optional[ResourcesSpec]) -> "Resources":
        """A copy with every field that ``spec`` sets replaced."""
        if spec is None:
            return self
        return dataclasses.replace(self, **{k: (int(v) if k == "memory" else v)
                                            for k, v in spec.model_dump().items() if v is not None})


class JobEntrySpec(_Strict):
    """One entry of ``jobs``: a recipe file, optionally renamed and with fields overridden."""

    recipe: str = Field(min_length=1, description="Recipe YAML, relative to the batch file.")
    name: Optional[str] = Field(None, description="Job name (its folder under output); default: the recipe's name.")
    overrides: dict[str, Any] = Field(default_factory=dict, description="Recipe fields to replace.")
    resources: Optional[ResourcesSpec] = None

    @field_validator("name")
    @classmethod
    def _folder_safe(cls, value: Optional[str]) -> Optional[str]:
        return None if value is None else _check_job_name(value)


class GridSpec(_Strict):
    """``grid``: the jobs models × passes × ratios, each a copy of ``base`` with those fields replaced."""

    base: str = Field(min_length=1, description="Recipe YAML every grid job starts from, relative to the batch file.")
    models: Optional[list[Annotated[str, Field(min_length=1)]]] = Field(None, min_length=1)
    passes: Optional[list[Any]] = Field(None, min_length=1, description="Each a pass name, one pass, or a pass list.")
    ratios: Optional[list[Ratio]] = Field(None, min_length=1)
    overrides: dict[str, Any] = Field(default_factory=dict)
    resources: Optional[ResourcesSpec] = None


class BatchSpec(_Strict):
    """The whole batch file."""

    output: Optional[str] = Field(None, min_length=1, description="Root folder; default outputs/<batch file stem>.")
    executor: Literal["local", "ray"] = "local"
    workers: int = Field(1, ge=1, description="local: jobs run at once, each in its own process.")
    address: Optional[str] = Field(None, min_length=1, description="ray: cluster address (else RAY_ADDRESS, else local).")
    retries: int = Field(1, ge=0, description="Extra attempts for a job that raises.")
    resources: Optional[ResourcesSpec] = None
    jobs: list[JobEntrySpec] = Field(default_factory=list)
    grid: Optional[GridSpec] = None


# ----------------------------------------------------------------------------------- jobs
@dataclass(frozen=True)
class BatchJob:
    """One expanded job: its unique name, the validated recipe it runs (``export.output`` is its
    folder), where in the batch file it came from, and the resources it asks for."""

    name: str
    recipe: Recipe
    origin: str
    resources: Resources = field(default_factory=Resources)

    @property
    def output_dir(self) -> Path:
        return Path(self.recipe.export.output)

    def recipe_data(self) -> dict[str, Any]:
        """The recipe as plain data, as the runner saves it in the folder (recipe.yaml)."""
        return self.recipe.to_dict()

    def outline(self) -> str:
        """``model: pass(ratio=0.2) → pass``, for listings."""
        steps = []
        for entry in self.recipe.passes:
            ratio = entry.options_dict().get("ratio")
            steps.append(f"{entry.name}(ratio={ratio:g})" if isinstance(ratio, (int, float)) else entry.name)
        return f"{self.recipe.model.source}: {' → '.join(steps) or 'no passes'}"


@dataclass(frozen=True)
class Batch:
    """A validated batch: its file, output root, how to run, and the expanded jobs in order."""

    source: Path
    output_root: Path
    executor: str
    workers: int
    address: Optional[str]
    retries: int
    jobs: tuple[BatchJob, ...]

    def with_settings(self, *, workers: Optional[int] = None, executor: Optional[str] = None) -> "Batch":
        """A copy with the worker count and/or executor replaced (the CLI's ``--workers``/``--executor``)."""
        changes = {k: v for k, v in (("workers", workers), ("executor", executor)) if v is not None}
        return dataclasses.replace(self, **changes)


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
    from compress import registry

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


# ----------------------------------------------------------------------------------- one attempt
def run_job_attempt(task: dict) -> dict:
    """Run one job's recipe in this (worker) process; never raises.

    Returns ``{"passed", "failures", "report", "seconds"}`` when the run finished (gates passed or
    not), or ``{"error": "Type: message", "traceback", "seconds"}`` when it raised.
    """
    started = time.perf_counter()
    try:
        if task.get("cwd") and Path(task["cwd"]).is_dir():
            os.chdir(task["cwd"])  # relative recipe paths resolve as in the process that loaded the batch
        from compress.run import run_recipe
        from compress.report import to_jsonable

        recipe = parse_recipe(task["recipe"], task["source"])
        result = run_recipe(recipe, output=Path(task["output"]), progress=False)
        return {"passed": bool(result.passed), "failures": list(result.failures), "report": to_jsonable(result.report),
                "seconds": time.perf_counter() - started}
    except Exception as error:  # reported as the job's failure; the batch goes on
        return {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc(),
                "seconds": time.perf_counter() - started}


def attempt_task(job: BatchJob) -> dict:
    """What a worker needs to run ``job``: plain data (picklable, and the same for every executor)."""
    return {"name": job.name, "recipe": job.recipe_data(), "source": job.recipe.source_name,
            "output": str(job.output_dir), "cwd": os.getcwd()}


# ----------------------------------------------------------------------------------- executors
class Executor(Protocol):
    """Runs job attempts somewhere. Used as a context manager around all submissions."""

    def __enter__(self) -> "Executor": ...

    def __exit__(self, *exc_info: Any) -> None: ...

    def submit(self, function: Callable[[dict], dict], task: dict, resources: Resources) -> Any:
        """Start ``function(task)``; return a handle."""

    def next_finished(self, handles: list) -> list[tuple[Any, dict]]:
        """Wait until at least one of ``handles`` finishes; return (handle, outcome dict) for each finished one."""


def limit_torch_threads(threads: int) -> None:
    """Worker initializer: jobs sharing a machine split its cores instead of each using all of them."""
    import torch

    torch.set_num_threads(threads)


class LocalAttempt:
    """One attempt queued on a LocalExecutor: the call to make and, once started, its future and
    the single-process pool that runs it."""

    def __init__(self, function: Callable[[dict], dict], task: dict):
        self.function = function
        self.task = task
        self.pool: Any = None
        self.future: Any = None


class LocalExecutor:
    """Runs each attempt in its own spawned process, at most ``workers`` at once, with the machine's
    cores split between them. A fresh process per attempt means a retry never inherits a broken CUDA
    context or a fragmented heap, and a process that dies (e.g. killed for memory) fails only its
    own job."""

    def __init__(self, workers: int):
        self.workers = workers
        self.threads = max(1, (os.cpu_count() or 1) // workers)
        self._waiting: list[LocalAttempt] = []
        self._running: list[LocalAttempt] = []

    def __enter__(self) -> "LocalExecutor":
        return self

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        for attempt in self._running:
            attempt.pool.shutdown(wait=exc_type is None, cancel_futures=True)
        self._waiting, self._running = [], []

    def submit(self, function: Callable[[dict], dict], task: dict, resources: Resources) -> LocalAttempt:
        attempt = LocalAttempt(function, task)
        self._waiting.append(attempt)
        self._start_waiting()
        return attempt

    def _start_waiting(self) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        while self._waiting and len(self._running) < self.workers:
            attempt = self._waiting.pop(0)
            attempt.pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                               initializer=limit_torch_threads, initargs=(self.threads,))
            attempt.future = attempt.pool.submit(attempt.function, attempt.task)
            self._running.append(attempt)

    def next_finished(self, handles: list) -> list[tuple[Any, dict]]:
        from concurrent.futures import FIRST_COMPLETED, wait

        running = [attempt for attempt in handles if attempt.future is not None]
        done, _ = wait([attempt.future for attempt in running], return_when=FIRST_COMPLETED)
        finished = [attempt for attempt in running if attempt.future in done]
        for attempt in finished:
            attempt.pool.shutdown(wait=True)
            self._running.remove(attempt)
        self._start_waiting()
        return [(attempt, _outcome_of(attempt.future.result, "worker process")) for attempt in finished]


def import_ray():
    """The ray module; a CompressError saying how to install it when it is missing."""
    try:
        import ray
    except ImportError:
        raise CompressError(RAY_MISSING) from None
    return ray


class RayExecutor:
    """Runs each attempt as a Ray task with the job's CPUs, GPUs and memory. Connects to the cluster
    at ``address`` (or RAY_ADDRESS), else starts a local one; disconnects (and so stops a local
    cluster it started) afterwards, unless Ray was already initialised by the caller."""

    def __init__(self, address: Optional[str] = None):
        self.address = address
        self._ray = None
        self._owns_connection = False
        self._remote: dict[Callable, Any] = {}

    def __enter__(self) -> "RayExecutor":
        ray = self._ray = import_ray()
        if not ray.is_initialized():
            ray.init(address=self.address)  # no address: RAY_ADDRESS, else a new local cluster
            self._owns_connection = True
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self._owns_connection:
            self._ray.shutdown()
            self._owns_connection = False

    def submit(self, function: Callable[[dict], dict], task: dict, resources: Resources) -> Any:
        if function not in self._remote:
            self._remote[function] = self._ray.remote(function)
        options: dict[str, Any] = {"num_cpus": resources.cpus, "num_gpus": resources.gpus, "max_retries": 0}
        if resources.memory:
            options["memory"] = resources.memory
        return self._remote[function].options(**options).remote(task)

    def next_finished(self, handles: list) -> list[tuple[Any, dict]]:
        ready, _ = self._ray.wait(list(handles), num_returns=1)
        return [(ref, _outcome_of(lambda ref=ref: self._ray.get(ref), "Ray task")) for ref in ready]


def _outcome_of(get_result: Callable[[], dict], what: str) -> dict:
    """The outcome a finished handle holds; an error outcome when the worker itself died."""
    try:
        return get_result()
    except Exception as error:
        return {"error": f"{what} failed: {type(error).__name__}: {error}", "traceback": traceback.format_exc(),
                "seconds": 0.0}


def make_executor(batch: Batch) -> Executor:
    """The executor the batch names."""
    return RayExecutor(batch.address) if batch.executor == "ray" else LocalExecutor(batch.workers)


# ----------------------------------------------------------------------------------- results
# Keys of the evaluation section that echo settings (seqlen, max_windows…), not results; its
# ``datasets`` holds the per-dataset results.
SETTING_KEYS = frozenset(EvaluateSpec.model_fields) - {"datasets"}


def headline_figures(report: dict) -> dict[str, float]:
    """The numeric leaves of a report's ``params`` and ``evaluation`` sections, by dotted path:
    ``params.pruning_ratio``, ``eval.persuasion.ppl_ratio`` (the ``datasets`` level is dropped),
    ``eval.top1_agreement``; evaluation settings such as ``seqlen`` are left out."""
    figures: dict[str, float] = {}
    _collect_numbers(report.get("params"), "params", figures)
    evaluation = report.get("evaluation")
    if isinstance(evaluation, dict):
        _collect_numbers({k: v for k, v in evaluation.items() if k not in SETTING_KEYS}, "eval", figures)
    return figures


def _collect_numbers(value: Any, prefix: str, out: dict[str, float]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _collect_numbers(item, prefix if key == "datasets" else f"{prefix}.{key}", out)
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        out[prefix] = value


@dataclass
class JobResult:
    """How one job ended: status (passed, skipped, gate_failed, failed), attempts made in this batch,
    seconds spent in them, its folder, the error or the failed gates, and its headline figures."""

    name: str
    status: str
    attempts: int
    seconds: float
    output_dir: str
    error: Optional[str] = None
    failures: list[str] = field(default_factory=list)
    figures: dict[str, float] = field(default_factory=dict)
    traceback: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.status in OK_STATUSES

    def note(self) -> str:
        """The error, or the failed gates joined by ``; ``; empty for a job that is fine."""
        return self.error or "; ".join(self.failures)


def finished_report(job: BatchJob) -> Optional[dict]:
    """The report.json in ``job``'s folder when it is from a run that passed its gates and (when the
    folder has its recipe.yaml) was made from this same recipe; None otherwise."""
    import yaml

    from compress.run.runner import RECIPE_COPY

    try:
        report = json.loads((job.output_dir / REPORT_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(report, dict) or not (report.get("validation") or {}).get("passed"):
        return None
    saved = job.output_dir / RECIPE_COPY
    if saved.is_file():
        try:
            if yaml.safe_load(saved.read_text(encoding="utf-8")) != job.recipe_data():
                return None
        except (OSError, yaml.YAMLError):
            return None
    return report


class ResultsTable:
    """The batch's results, one row per job in batch order, written as results.json, .csv and .md."""

    FIXED = ("name", "status", "attempts", "seconds", "output")

    def __init__(self, batch: Batch, results: list[JobResult]):
        self.batch = batch
        self.results = results

    def figure_columns(self) -> list[str]:
        """Every figure name of any job, in first-seen order."""
        return list(dict.fromkeys(key for result in self.results for key in result.figures))

    def rows(self) -> list[dict[str, Any]]:
        """One flat mapping per job: the fixed columns, every figure column (None where missing), note."""
        columns = self.figure_columns()
        return [{"name": r.name, "status": r.status, "attempts": r.attempts, "seconds": round(r.seconds, 2),
                 "output": r.output_dir, **{c: r.figures.get(c) for c in columns}, "note": r.note()}
                for r in self.results]

    def write(self, folder: Path) -> list[Path]:
        """Write the three files into ``folder``; return their paths."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = [folder / RESULTS_JSON, folder / RESULTS_CSV, folder / RESULTS_MD]
        paths[0].write_text(json.dumps(self.as_json(), indent=2) + "\n", encoding="utf-8")
        with paths[1].open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=[*self.FIXED, *self.figure_columns(), "note"])
            writer.writeheader()
            writer.writerows(self.rows())
        paths[2].write_text(self.markdown(), encoding="utf-8")
        return paths

    def as_json(self) -> dict[str, Any]:
        """The batch file, output root, a count per status, and every job with its figures and traceback."""
        counts = {status: sum(r.status == status for r in self.results) for status in (PASSED, SKIPPED, GATE_FAILED, FAILED)}
        return {"batch": str(self.batch.source), "output": str(self.batch.output_root), "counts": counts,
                "jobs": [dataclasses.asdict(r) for r in self.results]}

    def markdown(self) -> str:
        """A heading, the status counts and one table row per job."""
        from compress.report import MarkdownTable, fmt_number

        columns = self.figure_columns()
        table = MarkdownTable([*self.FIXED, *columns, "note"], right_aligned=[2, 3, *range(5, 5 + len(columns))])
        for row in self.rows():
            table.add_row(*(fmt_number(row[c]) if c in columns or c == "seconds" else row[c]
                            for c in (*self.FIXED, *columns)), row["note"])
        counts = self.as_json()["counts"]
        summary = ", ".join(f"{n} {status}" for status, n in counts.items() if n)
        return "\n".join([f"# Batch {self.batch.source.name}", "", f"{len(self.results)} jobs: {summary}.", "",
                          *table.render(), ""])


# ----------------------------------------------------------------------------------- running
class BatchProgress:
    """One line per finished job (and per retry) on a rich console."""

    STYLES = {PASSED: "green", SKIPPED: "cyan", GATE_FAILED: "yellow", FAILED: "red"}

    def __init__(self, total: int, console: Any = None):
        from rich.console import Console

        self.total = total
        self.done = 0
        self.console = console or Console(highlight=False)

    def finished(self, result: JobResult) -> None:
        from rich.markup import escape

        self.done += 1
        style = self.STYLES.get(result.status, "white")
        detail = f" — {escape(result.note())}" if result.note() else ""
        tries = f", {result.attempts} attempts" if result.attempts > 1 else ""
        self.console.print(f"[{self.done}/{self.total}] [{style}]{result.status}[/{style}] "
                           f"[bold]{escape(result.name)}[/bold] ({result.seconds:.1f} s{tries}){detail}",
                           soft_wrap=True)

    def retrying(self, name: str, attempt: int, error: str) -> None:
        from rich.markup import escape

        self.console.print(f"[yellow]retrying[/yellow] [bold]{escape(name)}[/bold] after attempt {attempt}: "
                           f"{escape(error)}", soft_wrap=True)


class BatchRunner:
    """Runs a batch's jobs on one executor: skips finished ones, retries the ones that raise, and
    returns one JobResult per job in batch order."""

    def __init__(self, batch: Batch, executor: Executor, *, job_function: Callable[[dict], dict] = run_job_attempt,
                 progress: Optional[BatchProgress] = None):
        self.batch = batch
        self.executor = executor
        self.job_function = job_function
        self.progress = progress

    def run(self) -> list[JobResult]:
        results: dict[str, JobResult] = {}
        todo = []
        for job in self.batch.jobs:
            report = finished_report(job)
            if report is None:
                todo.append(job)
            else:
                self._record(results, JobResult(job.name, SKIPPED, 0, 0.0, str(job.output_dir),
                                                figures=headline_figures(report)))
        if todo:
            with self.executor:
                self._run_all(todo, results)
        return [results[job.name] for job in self.batch.jobs]

    def _run_all(self, jobs: list[BatchJob], results: dict[str, JobResult]) -> None:
        pending: dict[Any, tuple[BatchJob, int, float]] = {}  # handle -> (job, attempt, seconds so far)
        for job in jobs:
            pending[self._submit(job)] = (job, 1, 0.0)
        while pending:
            for handle, outcome in self.executor.next_finished(list(pending)):
                job, attempt, seconds = pending.pop(handle)
                seconds += float(outcome.get("seconds") or 0.0)
                if "error" in outcome and attempt <= self.batch.retries:
                    if self.progress is not None:
                        self.progress.retrying(job.name, attempt, outcome["error"])
                    pending[self._submit(job)] = (job, attempt + 1, seconds)
                    continue
                self._record(results, job_result(job, outcome, attempt, seconds))

    def _submit(self, job: BatchJob) -> Any:
        return self.executor.submit(self.job_function, attempt_task(job), job.resources)

    def _record(self, results: dict[str, JobResult], result: JobResult) -> None:
        results[result.name] = result
        if self.progress is not None:
            self.progress.finished(result)


def job_result(job: BatchJob, outcome: dict, attempts: int, seconds: float) -> JobResult:
    """The JobResult of ``job``'s last attempt outcome (see :func:`run_job_attempt`)."""
    if "error" in outcome:
        return JobResult(job.name, FAILED, attempts, seconds, str(job.output_dir), error=outcome["error"],
                         traceback=outcome.get("traceback"))
    status = PASSED if outcome.get("passed") else GATE_FAILED
    failures = [] if status == PASSED else list(outcome.get("failures") or ["validation failed"])
    return JobResult(job.name, status, attempts, seconds, str(job.output_dir), failures=failures,
                     figures=headline_figures(outcome.get("report") or {}))


@dataclass
class BatchOutcome:
    """Every job's result in batch order and the results files written."""

    results: list[JobResult]
    files: list[Path]

    @property
    def ok(self) -> bool:
        """True when every job passed or was skipped."""
        return all(result.ok for result in self.results)


def prepare_output_root(batch: Batch) -> Path:
    """Create the batch's output root and mark it as compress's own. An existing root that holds
    files compress did not write is refused (OutputError) before any job runs."""
    from compress.outputs import OUTPUT_MARKER, check_output_folder, is_compress_output, make_folder

    root = Path(batch.output_root)
    if not (root.is_dir() and is_compress_output(root)):
        check_output_folder(root, option=f"{batch.source}: output", can_overwrite=False)
    make_folder(root, f"{batch.source}: output")
    marker = root / OUTPUT_MARKER
    if not marker.is_file():
        marker.write_text(json.dumps({"tool": "compress", "kind": "batch"}) + "\n", encoding="utf-8")
    return root


def run_batch(batch: Batch, *, progress: bool = True, executor: Optional[Executor] = None,
              job_function: Callable[[dict], dict] = run_job_attempt) -> BatchOutcome:
    """Run every job of ``batch`` (on its executor unless one is given) and write the results files
    into its output root; return the results and those files."""
    prepare_output_root(batch)
    runner = BatchRunner(batch, executor or make_executor(batch), job_function=job_function,
                         progress=BatchProgress(len(batch.jobs)) if progress else None)
    results = runner.run()
    files = ResultsTable(batch, results).write(batch.output_root)
    return BatchOutcome(results=results, files=files)


__all__ = [
    "Batch",
    "BatchJob",
    "BatchOutcome",
    "BatchRunner",
    "JobResult",
    "LocalExecutor",
    "RayExecutor",
    "ResultsTable",
    "finished_report",
    "headline_figures",
    "load_batch",
    "run_batch",
    "run_job_attempt",
]
