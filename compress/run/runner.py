"""The one stage list of every run, whatever the kind of model.

    run:    load ► reference ► passes ► report ► export ► reload check ► onnx ► evaluate ► conclude
    apply:  load ► reference ► replay ► report ► export ► reload check ► onnx ► evaluate ► conclude
    plan:   load ► reference ► passes ► save the plan

Each stage is a method of the run's model kind (:mod:`compress.kinds`), chosen once from the kinds
table; ``passes`` and ``conclude`` are the same for every kind. Everything is written into a staging
folder renamed into place at the end (:mod:`compress.outputs`), so a failed or interrupted run leaves
nothing under the output name; a failed gate still writes everything, with a ``FAILED`` marker.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from compress.devices import resolve_device
from compress.errors import PlanError
from compress.gates import failures_of, mark_result
from compress.kinds import kind_class
from compress.monitor import StageMonitor
from compress.outputs import OutputFolder
from compress.plan import Plan
from compress.preflight import preflight
from compress.registry import get_pass
from compress.report import write_report
from compress.replay import load_plan_for_apply
from compress.run.state import RunResult, RunState

RECIPE_COPY = "recipe.yaml"
APPLY_EVAL_WINDOWS = 64  # compress apply: evaluation windows per domain
RUN_STAGES = ("load", "reference", "passes", "report", "export", "reload_check", "onnx", "gguf", "evaluate")
APPLY_STAGES = ("load", "reference", "replay", "report", "export", "reload_check", "onnx", "gguf", "evaluate")
PLAN_STAGES = ("load", "reference", "passes")


# ----------------------------------------------------------------------------------- entry points
def run_recipe(recipe, *, output: Path | None = None, dry_run: bool = False, device: str | None = None,
               progress: bool = True, overwrite: bool = False) -> RunResult:
    """Run a validated recipe end to end and write the artifact folder. An existing output is
    replaced only when compress wrote it (or with ``overwrite``): see :mod:`compress.outputs`."""
    from compress.run.describe import dry_run_lines

    out = Path(output) if output else Path(recipe.export.output)
    if dry_run:
        return RunResult(output_dir=out, report={"dry_run": dry_run_lines(recipe, out, overwrite)}, passed=True)
    checked = preflight(recipe, out, overwrite=overwrite)
    state = recipe_state(recipe, device, progress, checked.kind)
    state.staging = OutputFolder(out, overwrite=overwrite)
    return execute(state, RUN_STAGES)


def apply_plan_file(plan_path: Path, model_source: str, output: Path, *, device: str | None = None,
                    dtype: str = "float32", progress: bool = True, evaluate: bool = True, overwrite: bool = False,
                    max_memory: int | None = None) -> RunResult:
    """``compress apply``: load the model, replay the plan, export and check it; with ``evaluate``
    (decoders), also the evaluation suite on its first ``APPLY_EVAL_WINDOWS`` windows per domain
    (dense figures included, cached). With ``max_memory``, block by block out of core."""
    from compress.kinds import kind_class, source_kind
    from compress.recipe import EvaluateSpec, ValidateSpec

    plan_path = Path(plan_path)
    plan = load_plan_for_apply(plan_path)
    kind, _info = source_kind(model_source)
    check_plan_kind(plan, plan_path, kind, model_source)
    state = RunState(name=f"apply {plan_path.name}", source=model_source, dtype=dtype, device=resolve_device(device),
                     progress=progress, kind_name=kind, plan_path=plan_path, validate=ValidateSpec(),
                     evaluate=EvaluateSpec(max_windows=APPLY_EVAL_WINDOWS)
                     if evaluate and kind_class(kind).evaluates_on_apply else None,
                     max_memory=max_memory)
    state.plan = plan
    state.staging = OutputFolder(Path(output), overwrite=overwrite)
    return execute(state, APPLY_STAGES)


def check_plan_kind(plan: Plan, plan_path: Path, kind: str, model_source: str) -> None:
    """A plan replays on the kind of model it was made on (ONNX plans on .onnx files, and so on)."""
    made_on = plan.model.get("format") or "hf"
    is_onnx = kind == "onnx"
    if (made_on == "onnx") != is_onnx:
        raise PlanError(f"{plan_path}: a plan made on an ONNX model replays on an .onnx file, and only such a "
                        f"plan does (plan format: {made_on}, model: {model_source})")


def make_plan(recipe, *, device: str | None = None, progress: bool = True) -> tuple[Plan, dict, StageMonitor]:
    """``compress plan``: the passes' scoring and allocation, no export or evaluation; returns the
    plan, what it changes (``kind.plan_summary``) and the stages' figures."""
    checked = preflight(recipe, check_output=False)
    state = recipe_state(recipe, device, progress, checked.kind)
    state.evaluate = None
    kind = kind_class(state.kind_name, state.max_memory is not None)(state)
    torch.manual_seed(recipe.seed)
    try:
        for stage in PLAN_STAGES:
            run_stage(kind, state, stage)
    finally:
        kind.cleanup()
    summary = kind.plan_summary()
    summary["stages"] = state.monitor.stages
    return state.plan, summary, state.monitor


# ----------------------------------------------------------------------------------- the stages
def recipe_state(recipe, device: str | None, progress: bool, kind: str) -> RunState:
    return RunState(name=recipe.name, source=recipe.model.source, dtype=recipe.model.dtype,
                    device=resolve_device(device or recipe.device), progress=progress, kind_name=kind,
                    recipe=recipe, seed=recipe.seed, trust_remote_code=recipe.model.trust_remote_code,
                    evaluate=recipe.evaluate, validate=recipe.validate, export=recipe.export,
                    max_memory=int(recipe.max_memory) if recipe.max_memory is not None else None)


def execute(state: RunState, stages: tuple[str, ...]) -> RunResult:
    """Run ``stages`` with the state's kind, then judge the gates and commit the staging folder."""
    kind = kind_class(state.kind_name, state.max_memory is not None)(state)
    if state.seed is not None:
        torch.manual_seed(state.seed)
    try:
        for stage in stages:
            run_stage(kind, state, stage)
        return conclude(state)
    except BaseException:
        state.staging.discard()
        raise
    finally:
        kind.cleanup()


def run_stage(kind, state: RunState, stage: str) -> None:
    if stage == "passes":
        run_passes(kind, state)
    elif stage == "replay":
        with state.stage("apply plan"):
            try:
                kind.replay(state.plan)
            except PlanError as error:
                raise PlanError(f"{state.plan_path}: {error} (model: {state.source})") from None
        state.pass_reports = [{"name": s.pass_name, "options": s.options, "wall_s": 0.0, "peak_rss_mb": 0.0,
                               "details": {"replayed": True, **kind.step_details(s)}} for s in state.plan.steps]
    elif stage == "report":
        state.report = {**kind.report_header(), **state.report, "passes": state.pass_reports}
        if state.recipe is not None:
            save_recipe_copy(state.recipe, state.folder)
    else:
        getattr(kind, stage)()


def run_passes(kind, state: RunState) -> None:
    """Run the recipe's passes in order on the kind's pass context, a plan step each."""
    state.ctx = kind.pass_context()
    state.plan = Plan(model=kind.plan_header())
    for entry in state.recipe.passes:
        spec = get_pass(entry.name)
        with state.stage(f"pass:{entry.name}") as record:
            step = spec.cls(entry.options).run(state.ctx)
        state.plan.steps.append(step)
        state.pass_reports.append({"name": entry.name, "options": entry.options.model_dump(),
                                   "wall_s": record["wall_s"], "peak_rss_mb": record["peak_rss_mb"],
                                   "details": kind.step_details(step)})
    kind.after_passes()


def save_recipe_copy(recipe, folder: Path) -> None:
    """The recipe as run, so ``compress validate DIR`` can find its gates later."""
    data = recipe.to_dict()
    data["name"] = recipe.name
    (folder / RECIPE_COPY).write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def conclude(state: RunState) -> RunResult:
    """Judge the gates, write report.json / report.md / the plot and the FAILED marker into the
    staging folder, and rename it into place."""
    failures = failures_of(state.gates)
    report = state.report
    report["validation"] = {"passed": not failures, "gates": [g.to_dict() for g in state.gates],
                            "device": state.device}
    report["stages"] = state.monitor.stages
    extras = ["report.json", "report.md"] + (["kept_widths.png"] if report.get("layers") else [])
    if (state.folder / RECIPE_COPY).is_file():
        extras.append(RECIPE_COPY)
    report["artifacts"] = {"dir": str(state.staging.final), "files": state.files + extras}
    write_report(state.folder, report)
    mark_result(state.folder, failures)
    final = state.staging.commit()
    return RunResult(output_dir=final, report=report, passed=not failures, failures=failures)
