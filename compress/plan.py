"""The pruning plan: what each pass kept, per layer, replayable without calibration data.

A plan holds one step per pruning pass. Indices in a step refer to the model as it was when that
step ran (the output of the previous step). Compensation biases are the float32 values added to
the existing o_proj/down_proj bias; JSON keeps float32 values exact, so `apply` reproduces the
pruned weights bit for bit.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from compress.errors import PlanError

PLAN_FORMAT = "compress.plan/1"


@dataclass
class LayerPlan:
    """What one decoder layer keeps. ``None`` means that part is untouched."""

    index: int
    keep_heads: list[int] | None = None
    keep_kv_heads: list[int] | None = None
    keep_channels: list[int] | None = None
    o_proj_bias: list[float] | None = None
    down_proj_bias: list[float] | None = None

    @staticmethod
    def bias_values(delta: torch.Tensor | None) -> list[float] | None:
        """float32 values of a compensation bias, as exact Python floats."""
        if delta is None:
            return None
        return delta.detach().to(torch.float32).cpu().tolist()


@dataclass
class PlanStep:
    pass_name: str
    options: dict
    layers: list[LayerPlan]


@dataclass
class Plan:
    model: dict = field(default_factory=dict)
    steps: list[PlanStep] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"format": PLAN_FORMAT, "model": self.model, "steps": [asdict(s) for s in self.steps]}

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def from_dict(cls, data: dict, source: str = "plan") -> "Plan":
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise PlanError(f"{source}: not a compress plan (expected \"format\": \"{PLAN_FORMAT}\")")
        try:
            steps = [
                PlanStep(
                    pass_name=s["pass_name"],
                    options=s.get("options", {}),
                    layers=[LayerPlan(**layer) for layer in s["layers"]],
                )
                for s in data["steps"]
            ]
        except (KeyError, TypeError) as exc:
            raise PlanError(f"{source}: malformed plan step ({exc})") from None
        return cls(model=data.get("model", {}), steps=steps)

    @classmethod
    def load(cls, path: Path) -> "Plan":
        path = Path(path)
        if not path.is_file():
            raise PlanError(f"{path}: plan file not found")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise PlanError(f"{path}: not valid JSON ({exc})") from None
        return cls.from_dict(data, str(path))
