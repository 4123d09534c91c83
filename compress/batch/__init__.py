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

The package, by job: :mod:`~compress.batch.spec` (the batch file's schema),
:mod:`~compress.batch.jobs` (an expanded batch and its jobs), :mod:`~compress.batch.loading`
(reading, expanding and naming), :mod:`~compress.batch.attempt` (one attempt in a worker),
:mod:`~compress.batch.executors` (process pool, Ray), :mod:`~compress.batch.results` (how each job
ended), :mod:`~compress.batch.report` (results.json/.csv/.md) and :mod:`~compress.batch.runner`
(skips, retries, progress, :func:`run_batch`).
"""

from __future__ import annotations

from compress.batch.attempt import attempt_task, run_job_attempt
from compress.batch.executors import (
    RAY_MISSING,
    Executor,
    LocalAttempt,
    LocalExecutor,
    RayExecutor,
    import_ray,
    limit_torch_threads,
    make_executor,
)
from compress.batch.jobs import Batch, BatchJob
from compress.batch.loading import BatchLoader, SourceRecipe, deep_merge, load_batch, model_slug, safe_name
from compress.batch.report import RESULTS_CSV, RESULTS_JSON, RESULTS_MD, ResultsTable
from compress.batch.results import (
    FAILED,
    GATE_FAILED,
    OK_STATUSES,
    PASSED,
    SETTING_KEYS,
    SKIPPED,
    JobResult,
    finished_report,
    headline_figures,
    job_result,
)
from compress.batch.runner import BatchOutcome, BatchProgress, BatchRunner, prepare_output_root, run_batch
from compress.batch.spec import (
    JOB_NAME,
    BatchSpec,
    GridSpec,
    JobEntrySpec,
    Ratio,
    Resources,
    ResourcesSpec,
    check_job_name,
)

__all__ = [
    "FAILED",
    "GATE_FAILED",
    "JOB_NAME",
    "OK_STATUSES",
    "PASSED",
    "RAY_MISSING",
    "RESULTS_CSV",
    "RESULTS_JSON",
    "RESULTS_MD",
    "SETTING_KEYS",
    "SKIPPED",
    "Batch",
    "BatchJob",
    "BatchLoader",
    "BatchOutcome",
    "BatchProgress",
    "BatchRunner",
    "BatchSpec",
    "Executor",
    "GridSpec",
    "JobEntrySpec",
    "JobResult",
    "LocalAttempt",
    "LocalExecutor",
    "Ratio",
    "RayExecutor",
    "Resources",
    "ResourcesSpec",
    "ResultsTable",
    "SourceRecipe",
    "attempt_task",
    "check_job_name",
    "deep_merge",
    "finished_report",
    "headline_figures",
    "import_ray",
    "job_result",
    "limit_torch_threads",
    "load_batch",
    "make_executor",
    "model_slug",
    "prepare_output_root",
    "run_batch",
    "run_job_attempt",
    "safe_name",
]
