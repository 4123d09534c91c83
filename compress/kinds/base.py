"""What every model kind does at each stage of a run (see :mod:`compress.run.runner`).

A kind is a strategy chosen once per run from :data:`compress.kinds.KINDS`: it knows how to load
that kind of model, what to measure on the dense model before the passes run, what a pass sees,
how to export, check, evaluate and describe the result in its own words. The runner only calls
the stages in order; the kind carries what one stage hands the next (an evaluator, dense counts).
"""

from __future__ import annotations

import datetime as _dt
from typing import TYPE_CHECKING, ClassVar

import torch

from compress.context import PassContext
from compress.gates import Gate
from compress.memory import own_weights, release_memory
from compress.models.loading import load_model

if TYPE_CHECKING:  # the run state is built by compress.run, which imports the kinds
    from compress.plan import Plan, PlanStep
    from compress.run.state import RunState

ONNX_SUBDIR = "onnx"


class ModelKind:
    """Base of the kinds: every stage is a method; the defaults do nothing."""

    name: ClassVar[str] = ""
    words: ClassVar[str] = ""  # "decoder", "encoder", ... as the messages call it
    plan_format: ClassVar[str | None] = None  # plan.model["format"] of its plans (None: decoders)
    streamed: ClassVar[bool] = False  # out of core: one block in memory at a time
    calibration_unit: ClassVar[str] = "windows"  # what calibration.samples counts
    evaluates_on_apply: ClassVar[bool] = False  # compress apply measures the replayed model

    # ---------------------------------------------------------------------------- dry run
    @classmethod
    def describe_evaluation(cls, evaluate) -> str:
        """The dry run's ``evaluate`` line: what is measured, in the kind's terms."""
        return "none for this kind of model"

    @classmethod
    def describe_execution(cls, recipe) -> str | None:
        """The dry run's ``memory`` line (how the model is held), or None for in memory."""
        return None

    quantizes_onnx = False  # writes export.onnx.quantize variants of its ONNX export
    writes_gguf = False  # writes formats: [gguf]

    @classmethod
    def describe_gates(cls, validate, export) -> list[str]:
        """The dry run's ``validate`` line: the gates that are checked."""
        return [f"reload max|Δ| ≤ {validate.reload_max_abs_diff}"]

    def __init__(self, state: "RunState"):
        self.state = state

    # ---------------------------------------------------------------------------------- stages
    def load(self) -> None:
        """Load the model (and its tokenizer or processor) into ``state``."""
        raise NotImplementedError

    def load_pretrained(self) -> None:
        """The load stage of a transformers model: the model and its tokenizer (or processor)."""
        s = self.state
        with s.stage("load"):
            loaded = load_model(s.source, dtype=s.dtype, device=s.device, trust_remote_code=s.trust_remote_code,
                                progress=s.progress)
        s.model, s.tokenizer = loaded.model, loaded.tokenizer

    def gate_reload(self, measure, detail: str) -> float:
        """The reload check: ``measure()`` (max |Δ| between the in-memory model and the export reloaded
        from disk) in its stage, gated by ``validate.reload_max_abs_diff``."""
        s = self.state
        with s.stage("reload check"):
            diff = measure()
        s.gate(Gate.check("reload_max_abs_diff", diff, s.validate.reload_max_abs_diff, "<=", detail))
        return diff

    def reference(self) -> None:
        """Before any pass: dense counts, and what the evaluation compares against."""

    def pass_context(self) -> PassContext:
        """What the passes see (model, tokenizer, calibration data, ...)."""
        s = self.state
        return PassContext(model=s.model, tokenizer=s.tokenizer, progress=s.progress)

    def after_passes(self) -> None:
        """Once the passes ran: drop a distillation teacher, and release the dense checkpoint's
        memory map that the kept weights still view (:func:`compress.memory.own_weights`)."""
        if self.state.ctx is not None and hasattr(self.state.ctx, "release_dense"):
            self.state.ctx.release_dense()
        if isinstance(self.state.model, torch.nn.Module):
            own_weights(self.state.model)
            release_memory()

    def cleanup(self) -> None:
        """At the end of the run, whatever happened (temporary folders)."""

    def plan_header(self) -> dict:
        """``plan.model``: what ``apply`` checks the plan against."""
        return {"source": self.state.source, "architecture": type(self.state.model).__name__}

    def step_details(self, step: "PlanStep") -> dict:
        """What a step changed, for the report."""
        return dict(step.details)

    def report_header(self) -> dict:
        """The report's opening sections, after the passes ran (params in the kind's terms)."""
        return base_header(self.state)

    def replay(self, plan: "Plan") -> None:
        """``compress apply``: make the loaded model what ``plan`` describes."""
        raise NotImplementedError

    def export(self) -> None:
        """Write the model files into the staging folder (``state.files``)."""

    def reload_check(self) -> None:
        """Gate: the export loads back and computes what the in-memory model does."""

    def onnx(self) -> None:
        """ONNX export and its parity gates, when the recipe asks for ONNX."""

    def gguf(self) -> None:
        """GGUF export for llama.cpp and its gates, when the recipe asks for GGUF."""

    def evaluate(self) -> None:
        """Quality against the dense reference (``report["evaluation"]``) and its gates."""

    def plan_summary(self) -> dict:
        """What ``compress plan`` prints: the steps and the kind's ratio."""
        return {"steps": [{"pass": step.pass_name} for step in self.state.plan.steps]}


def base_header(state: "RunState") -> dict:
    """Recipe, model, time, device, dtype and seed: the first lines of every report."""
    return {
        "recipe": state.name,
        "kind": state.kind_name,
        "model": state.source,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": state.device,
        "dtype": state.dtype,
        "seed": state.seed,
    }


def target_ratio(state: "RunState") -> float | None:
    """The ``ratio`` of the last pass that has one (recipe run) or of the last replayed step (apply)."""
    if state.recipe is not None:
        return next((e.options.ratio for e in reversed(state.recipe.passes) if hasattr(e.options, "ratio")), None)
    if state.plan is not None:
        return next((s.options.get("ratio") for s in reversed(state.plan.steps) if "ratio" in s.options), None)
    return None
