"""The batch report: one row per job, in batch order, with its status and headline figures,
written into the output root as results.json, results.csv and results.md."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path
from typing import Any

from compress.batch.jobs import Batch
from compress.batch.results import FAILED, GATE_FAILED, PASSED, SKIPPED, JobResult
from compress.report import MarkdownTable, fmt_number

RESULTS_JSON, RESULTS_CSV, RESULTS_MD = "results.json", "results.csv", "results.md"


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
        columns = self.figure_columns()
        table = MarkdownTable([*self.FIXED, *columns, "note"], right_aligned=[2, 3, *range(5, 5 + len(columns))])
        for row in self.rows():
            table.add_row(*(fmt_number(row[c]) if c in columns or c == "seconds" else row[c]
                            for c in (*self.FIXED, *columns)), row["note"])
        counts = self.as_json()["counts"]
        summary = ", ".join(f"{n} {status}" for status, n in counts.items() if n)
        return "\n".join([f"# Batch {self.batch.source.name}", "", f"{len(self.results)} jobs: {summary}.", "",
                          *table.render(), ""])
