"""One attempt at one job, as a worker runs it: the plain-data task built from a
:class:`~compress.batch.jobs.BatchJob`, and :func:`run_job_attempt`, which runs its recipe and
returns an outcome mapping instead of raising."""

from __future__ import annotations

import os
import time
import traceback
from pathlib import Path

from compress.batch.jobs import BatchJob
from compress.recipe.parsing import parse_recipe
from compress.report import to_jsonable


def run_job_attempt(task: dict) -> dict:
    """Run one job's recipe in this (worker) process; never raises.

    Returns ``{"passed", "failures", "report", "seconds"}`` when the run finished (gates passed or
    not), or ``{"error": "Type: message", "traceback", "seconds"}`` when it raised.
    """
    started = time.perf_counter()
    try:
        if task.get("cwd") and Path(task["cwd"]).is_dir():
            os.chdir(task["cwd"])  # relative recipe paths resolve as in the process that loaded the batch
        from compress.run import run_recipe  # torch and the model code: only in the worker that runs a job

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
