"""``compress batch``: many recipes or a grid on a process pool or Ray."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from compress.cli.common import EXIT_GATE_FAILED, QuietOption, stdout_console, app, print_error


class ExecutorChoice(str, Enum):
    """Where a batch's jobs run."""

    local = "local"
    ray = "ray"


@app.command("batch")
def batch_command(
    batch_file: Annotated[
        Path, typer.Argument(help="The batch YAML file: jobs and/or a grid (fields: docs/batch.md).", show_default=False)
    ],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Validate the batch file and list its jobs, without running any.")
    ] = False,
    workers: Annotated[
        Optional[int],
        typer.Option("--workers", "-w", min=1, help="local executor: jobs at once; replaces the file's workers.",
                     show_default=False),
    ] = None,
    executor: Annotated[
        Optional[ExecutorChoice],
        typer.Option("--executor", help="Replaces the file's executor: local (worker processes) or ray (Ray tasks).",
                     show_default=False),
    ] = None,
    quiet: QuietOption = False,
) -> None:
    """Run many recipes: a list of recipe jobs and/or a grid of models × passes × ratios from a base recipe.

    Each job writes its own folder under the batch's output root; finished jobs are skipped, jobs
    that raise are retried, and [bold]results.json[/bold], [bold]results.csv[/bold] and
    [bold]results.md[/bold] are written into the root. Exits with 2 on a bad batch file and 3 when
    any job failed or failed a gate.
    """
    from compress.batch import load_batch, run_batch

    batch = load_batch(batch_file).with_settings(workers=workers, executor=executor.value if executor else None)
    if dry_run:
        stdout_console().print(batch_jobs_table(batch))
        return
    if not quiet:
        stdout_console().print(f"running [bold]{len(batch.jobs)}[/bold] jobs from {escape(str(batch.source))} "
                        f"({escape(_batch_executor(batch))}) "
                        f"into [bold]{escape(str(batch.output_root))}[/bold]")
    outcome = run_batch(batch, progress=not quiet)
    results_md = next(path for path in outcome.files if path.suffix == ".md")
    stdout_console().print(f"results: [bold]{escape(str(results_md))}[/bold]")
    bad = [result for result in outcome.results if not result.ok]
    for result in bad:
        print_error(f"{result.name}: {result.status}: {result.note()}")
    if bad:
        raise typer.Exit(EXIT_GATE_FAILED)


def _batch_executor(batch: Any) -> str:
    """``local, 2 workers`` or ``ray``."""
    if batch.executor != "local":
        return batch.executor
    return f"local, {batch.workers} worker" + ("s" if batch.workers != 1 else "")


def batch_jobs_table(batch: Any) -> Table:
    """The expanded jobs of a batch: name, model and passes, output folder, and whether it would run."""
    from compress.batch import finished_report

    table = Table(title=escape(f"{batch.source}: {len(batch.jobs)} jobs ({_batch_executor(batch)}, "
                               f"retries {batch.retries})"),
                  title_justify="left")
    for column in ("job", "model: passes", "output", "state"):
        table.add_column(column)
    for job in batch.jobs:
        state = "skip (done)" if finished_report(job) is not None else "run"
        table.add_row(escape(job.name), escape(job.outline()), escape(str(job.output_dir)), state)
    return table


