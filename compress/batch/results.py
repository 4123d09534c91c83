"""How each job ended: the statuses, :class:`JobResult`, the headline figures read from a report,
the outcome of a job's last attempt as a JobResult, and the finished report that lets a rerun skip
a job."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from compress.batch.jobs import BatchJob
from compress.recipe.schema import EvaluateSpec
from compress.report import REPORT_JSON

PASSED, SKIPPED, GATE_FAILED, FAILED = "passed", "skipped", "gate_failed", "failed"
OK_STATUSES = (PASSED, SKIPPED)


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
    from compress.run.runner import RECIPE_COPY  # compress.run imports torch: only when a job is checked

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


def job_result(job: BatchJob, outcome: dict, attempts: int, seconds: float) -> JobResult:
    """The JobResult of ``job``'s last attempt outcome (see :func:`compress.batch.attempt.run_job_attempt`)."""
    if "error" in outcome:
        return JobResult(job.name, FAILED, attempts, seconds, str(job.output_dir), error=outcome["error"],
                         traceback=outcome.get("traceback"))
    status = PASSED if outcome.get("passed") else GATE_FAILED
    failures = [] if status == PASSED else list(outcome.get("failures") or ["validation failed"])
    return JobResult(job.name, status, attempts, seconds, str(job.output_dir), failures=failures,
                     figures=headline_figures(outcome.get("report") or {}))
