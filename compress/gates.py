"""Gates: a measured value, a threshold and a comparison. A failed gate fails the run (exit 3).

Every kind of model produces its gates in its own stages (reload, ONNX parity, quality); the run
judges them all here and marks a failed artifact with a ``FAILED`` file.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

FAILED_MARKER = "FAILED"


@dataclass
class Gate:
    """One check: ``value op threshold`` must hold. ``detail`` says what was measured, in words."""

    name: str
    value: Any
    threshold: Any
    op: str
    passed: bool
    detail: str = ""

    @classmethod
    def check(cls, name: str, value, threshold, op: str, detail: str = "") -> "Gate | None":
        """A gate, or None when it is off (no threshold) or nothing was measured."""
        if threshold is None or value is None:
            return None
        if op == "<=":
            passed = value <= threshold
        elif op == ">=":
            passed = value >= threshold
        elif op == "==":
            passed = value == threshold
        else:
            raise ValueError(f"unknown comparison {op!r}")
        if isinstance(value, float) and math.isnan(value):
            passed = False
        return cls(name, value, threshold, op, bool(passed), detail)

    def failure_message(self) -> str:
        value = f"{self.value:.6g}" if isinstance(self.value, float) else str(self.value)
        text = f"{self.name} = {value} (must be {self.op} {self.threshold})"
        return f"{text}: {self.detail}" if self.detail else text

    def to_dict(self) -> dict:
        return asdict(self)


def failures_of(gates: list[Gate]) -> list[str]:
    return [g.failure_message() for g in gates if not g.passed]


def mark_result(folder: Path, failures: list[str]) -> None:
    """Write ``FAILED`` (one failure per line) into a failed artifact; remove a stale one otherwise."""
    marker = Path(folder) / FAILED_MARKER
    if failures:
        marker.write_text("validation failed:\n" + "\n".join(failures) + "\n", encoding="utf-8")
    else:
        marker.unlink(missing_ok=True)
