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
import math
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

    INDEX_FIELDS = ("keep_heads", "keep_kv_heads", "keep_channels")
    BIAS_FIELDS = ("o_proj_bias", "down_proj_bias")

    @classmethod
    def from_dict(cls, data: dict, where: str) -> "LayerPlan":
        """A layer plan from plan.json, with its types checked (PlanError naming ``where`` otherwise):
        the index and the kept indices are whole numbers >= 0, the biases finite numbers."""
        if not isinstance(data, dict):
            raise PlanError(f"{where}: a layer entry must be a mapping")
        unknown = sorted(set(data) - {"index", *cls.INDEX_FIELDS, *cls.BIAS_FIELDS})
        if unknown:
            raise PlanError(f"{where}: unknown layer field(s) {', '.join(unknown)}")
        if not _whole(data.get("index")):
            raise PlanError(f"{where}: \"index\" must be a whole number >= 0 (got {data.get('index')!r})")
        for name in cls.INDEX_FIELDS:
            value = data.get(name)
            if value is not None and not (isinstance(value, list) and all(_whole(v) for v in value)):
                raise PlanError(f"{where}: {name} must be null or a list of whole numbers >= 0")
        for name in cls.BIAS_FIELDS:
            value = data.get(name)
            if value is not None and not (isinstance(value, list) and all(_finite(v) for v in value)):
                raise PlanError(f"{where}: {name} must be null or a list of finite numbers")
        return cls(**data)

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


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


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


def _step_from_dict(data, source: str, index: int, folder: Path | None) -> PlanStep:
    where = f"{source}: step {index}"
    if not isinstance(data, dict):
        raise PlanError(f"{where}: must be a mapping")
    name, options, layers = data.get("pass_name"), data.get("options", {}), data.get("layers")
    details = data.get("details", {})
    if not isinstance(name, str) or not name:
        raise PlanError(f"{where}: \"pass_name\" must be a pass name")
    if not isinstance(options, dict) or not isinstance(details, dict) or not isinstance(layers, list):
        raise PlanError(f"{where} ({name}): \"options\" and \"details\" must be mappings, \"layers\" a list")
    return PlanStep(pass_name=name, options=options,
                    layers=[LayerPlan.from_dict(layer, f"{where} ({name}) layer entry {j}")
                            for j, layer in enumerate(layers)],
                    artifacts=_load_artifacts(data.get("artifacts", {}), folder, source, index), details=details)


@dataclass
class Plan:
    model: dict = field(default_factory=dict)
    steps: list[PlanStep] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"format": PLAN_FORMAT, "model": self.model, "steps": [s.to_dict(i) for i, s in enumerate(self.steps)]}

    def save_names(self, path: Path) -> list[str]:
        """The file names :meth:`save` writes for ``path``: plan.json first, then the artifacts."""
        return [Path(path).name] + [artifact_file(index, name) for index, step in enumerate(self.steps)
                                    for name in step.artifacts]

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
        model, raw_steps = data.get("model", {}), data.get("steps")
        if not isinstance(model, dict) or not isinstance(raw_steps, list):
            raise PlanError(f"{source}: \"model\" must be a mapping and \"steps\" a list")
        return cls(model=model, steps=[_step_from_dict(s, source, i, folder) for i, s in enumerate(raw_steps)])

    @classmethod
    def load(cls, path: Path) -> "Plan":
        path = Path(path)
        if not path.is_file():
            raise PlanError(f"{path}: plan file not found")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise PlanError(f"{path}: not a readable JSON plan ({exc})") from None
        return cls.from_dict(data, str(path), folder=path.parent)
