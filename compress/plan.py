"""The pruning plan: what each pass kept, per layer, replayable without calibration data.

A plan holds one step per pruning pass. Indices in a step refer to the model as it was when that
step ran (the output of the previous step). Compensation biases are the float32 values added to
the existing o_proj/down_proj bias; JSON keeps float32 values exact, so `apply` reproduces the
pruned weights bit for bit.

A step may also carry tensor ``artifacts`` (name -> tensor dict, e.g. the LoRA factors of
``lora_recover``): they are saved beside plan.json as ``<step-index>-<name>.safetensors``, named in
the step's ``"artifacts"`` entry, loaded back by :meth:`Plan.load` and re-applied by the pass's
``replay(model, step)`` during ``apply``. ``details`` is what the step reports (kept in plan.json).
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
    artifacts: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    details: dict = field(default_factory=dict)

    def to_dict(self, index: int) -> dict:
        data = {"pass_name": self.pass_name, "options": self.options, "layers": [asdict(p) for p in self.layers]}
        if self.details:
            data["details"] = self.details
        if self.artifacts:
            data["artifacts"] = {name: artifact_file(index, name) for name in self.artifacts}
        return data


def artifact_file(index: int, name: str) -> str:
    """File name of artifact ``name`` of step ``index``, beside plan.json."""
    return f"{index}-{name}.safetensors"


def _load_artifacts(files: dict, folder: Path | None, source: str, index: int) -> dict[str, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    if not isinstance(files, dict):
        raise PlanError(f"{source}: step {index}: \"artifacts\" must map names to file names")
    artifacts = {}
    for name, file_name in files.items():
        if folder is None:
            raise PlanError(f"{source}: step {index} needs the artifact file {file_name}; load the plan from its file")
        if not isinstance(file_name, str) or Path(file_name).name != file_name:
            raise PlanError(f"{source}: step {index}: artifact {name!r} must be a plain file name, got {file_name!r}")
        path = Path(folder) / file_name
        if not path.is_file():
            raise PlanError(f"{source}: step {index} needs {file_name} beside the plan; not found in {folder}")
        try:
            artifacts[name] = load_file(path)
        except Exception as exc:  # safetensors raises its own error type for a torn file
            raise PlanError(f"{source}: step {index}: cannot read {file_name} ({exc})") from None
    return artifacts


@dataclass
class Plan:
    model: dict = field(default_factory=dict)
    steps: list[PlanStep] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"format": PLAN_FORMAT, "model": self.model, "steps": [s.to_dict(i) for i, s in enumerate(self.steps)]}

    def save(self, path: Path) -> list[str]:
        """Write plan.json and the steps' artifact files beside it; return the file names written."""
        from safetensors.torch import save_file

        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        written = [path.name]
        for index, step in enumerate(self.steps):
            for name, tensors in step.artifacts.items():
                file_name = artifact_file(index, name)
                save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, path.parent / file_name)
                written.append(file_name)
        return written

    @classmethod
    def from_dict(cls, data: dict, source: str = "plan", folder: Path | None = None) -> "Plan":
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise PlanError(f"{source}: not a compress plan (expected \"format\": \"{PLAN_FORMAT}\")")
        try:
            steps = [
                PlanStep(
                    pass_name=s["pass_name"],
                    options=s.get("options", {}),
                    layers=[LayerPlan(**layer) for layer in s["layers"]],
                    artifacts=_load_artifacts(s.get("artifacts", {}), folder, source, i),
                    details=s.get("details", {}),
                )
                for i, s in enumerate(data["steps"])
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
        return cls.from_dict(data, str(path), folder=path.parent)
