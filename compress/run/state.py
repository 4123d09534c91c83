"""The run state: what one ``run``, ``plan`` or ``apply`` carries from stage to stage."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compress.gates import Gate
from compress.monitor import StageMonitor
from compress.outputs import OutputFolder
from compress.plan import Plan


@dataclass
class RunResult:
    """What a run wrote and how its gates went."""

    output_dir: Path
    report: dict
    passed: bool
    failures: list[str] = field(default_factory=list)


@dataclass
class RunState:
    """One run: its settings, the model as the stages change it, and what they produced.

    ``recipe`` is the recipe (run, plan) or None (apply: the plan file is ``plan_path``);
    ``evaluate``/``validate``/``export`` are its sections (or what ``apply`` uses instead).
    """

    name: str
    source: str
    dtype: str
    device: str
    progress: bool
    kind_name: str = ""
    recipe: Any = None
    seed: int | None = None
    trust_remote_code: bool = False
    evaluate: Any = None
    validate: Any = None
    export: Any = None
    max_memory: int | None = None  # bytes: out of core, one block in memory at a time
    plan_path: Path | None = None
    staging: OutputFolder | None = None
    monitor: StageMonitor = field(default_factory=StageMonitor)
    model: Any = None
    tokenizer: Any = None  # or an image processor / a VLM processor
    ctx: Any = None  # the PassContext the passes share
    plan: Plan | None = None
    report: dict = field(default_factory=dict)
    pass_reports: list[dict] = field(default_factory=list)
    gates: list[Gate] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    @property
    def folder(self) -> Path:
        """The staging folder the artifact is written into."""
        return self.staging.path

    def gate(self, *gates: Gate | None) -> None:
        """Record gates (None: a gate that is off or measured nothing)."""
        self.gates += [g for g in gates if g is not None]

    def stage(self, name: str):
        return self.monitor.stage(name)
