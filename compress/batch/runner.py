"""Running a batch: its output root prepared, finished jobs skipped, the others submitted to an
executor and retried when they raise, one progress line per finished job, and the results files
written (:func:`run_batch`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from rich.console import Console
from rich.markup import escape

from compress.batch.attempt import attempt_task, run_job_attempt
from compress.batch.executors import Executor, make_executor
from compress.batch.jobs import Batch, BatchJob
from compress.batch.report import ResultsTable
from compress.batch.results import (
    FAILED,
    GATE_FAILED,
    PASSED,
    SKIPPED,
    JobResult,
    finished_report,
    headline_figures,
    job_result,
)
from compress.outputs import OUTPUT_MARKER, check_output_folder, is_compress_output, make_folder


class BatchProgress:
    """One line per finished job (and per retry) on a rich console."""

    STYLES = {PASSED: "green", SKIPPED: "cyan", GATE_FAILED: "yellow", FAILED: "red"}

    def __init__(self, total: int, console: Any = None):
        self.total = total
        self.done = 0
        self.console = console or Console(highlight=False)

    def finished(self, result: JobResult) -> None:
        self.done += 1
        style = self.STYLES.get(result.status, "white")
        detail = f" — {escape(result.note())}" if result.note() else ""
        tries = f", {result.attempts} attempts" if result.attempts > 1 else ""
        self.console.print(f"[{self.done}/{self.total}] [{style}]{result.status}[/{style}] "
                           f"[bold]{escape(result.name)}[/bold] ({result.seconds:.1f} s{tries}){detail}",
                           soft_wrap=True)

    def retrying(self, name: str, attempt: int, error: str) -> None:
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
