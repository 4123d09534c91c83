"""``compress plan RECIPE -o plan.json|DIR``: run the passes' scoring and allocation, write the plan.

Nothing is exported or evaluated: the output is ``plan.json`` (and the step artifacts beside it),
which ``compress apply plan.json --model M -o DIR`` turns into the same weights a ``compress run``
of the recipe writes. Data-free passes (``magnitude_sp``; ``spa`` with magnitude importance or a
synthetic / identity Hessian) read no calibration text, so a recipe made of them needs no corpus
(``calibration: null``). With ``max_memory`` the passes run out of core (one block in memory).

The plan is written to a temporary folder and moved into place at the end, so an interrupted
run leaves no half-written plan.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from compress.errors import CompressError, OutputError
from compress.monitor import StageMonitor
from compress.plan import PLAN_FORMAT, Plan

PLAN_FILE = "plan.json"


@dataclass
class PlanResult:
    """Where the plan went, the plan, and what it changes (for the summary)."""

    path: Path
    plan: Plan
    files: list[str]
    summary: dict = field(default_factory=dict)


def plan_destination(output: Path) -> tuple[Path, str]:
    """(folder, file name): ``x.json`` is the plan file itself, anything else a folder for plan.json."""
    output = Path(output)
    if output.suffix.lower() == ".json":
        return output.parent, output.name
    return output, PLAN_FILE


def make_plan(recipe, output: Path, *, device: str | None = None, progress: bool = True,
              overwrite: bool = False) -> PlanResult:
    """Run ``recipe``'s passes (scoring, allocation, surgery on the in-memory or streamed model) and
    write the plan to ``output``; nothing else is written."""
    from compress.onnx_pipeline import is_onnx_source

    from compress.preflight import preflight

    folder, name = plan_destination(output)
    check_plan_destination(folder, name, overwrite)
    preflight(recipe, check_output=False)
    torch.manual_seed(recipe.seed)
    monitor = StageMonitor()
    if is_onnx_source(recipe.model.source):
        plan, summary = _onnx_plan(recipe, monitor, progress)
    elif recipe.max_memory is not None:
        plan, summary = _streamed_plan(recipe.with_overrides(device=device), monitor, progress)
    else:
        plan, summary = _in_memory_plan(recipe, device, monitor, progress)
    summary["stages"] = monitor.stages
    check_plan_destination(folder, name, overwrite, plan)
    files = save_plan(plan, folder, name)
    return PlanResult(path=folder / name, plan=plan, files=files, summary=summary)


def is_compress_plan(path: Path) -> bool:
    """True when ``path`` is a plan file compress wrote (JSON with the plan format tag)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4096)
    except OSError:
        return False
    return PLAN_FORMAT.encode() in head


def check_plan_destination(folder: Path, name: str, overwrite: bool, plan: Plan | None = None) -> None:
    """Refuse (OutputError) to write the plan over a file compress did not write: the plan file
    itself, or (with ``plan``) one of its artifact files when no compress plan sits beside them."""
    from compress.outputs import check_output_file, forbidden_output_reason

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"--output {folder}: is a file, not a folder; give a .json path or a folder")
    reason = forbidden_output_reason(folder / name)
    if reason is not None:
        raise OutputError(f"--output {folder / name}: refused because {reason}")
    plan_path = folder / name
    own_plan = is_compress_plan(plan_path)
    check_output_file(plan_path, is_own=is_compress_plan, overwrite=overwrite)
    for file in (plan.save_names(plan_path) if plan is not None else [])[1:]:
        check_output_file(folder / file, is_own=lambda _: own_plan, overwrite=overwrite)


def save_plan(plan: Plan, folder: Path, name: str = PLAN_FILE) -> list[str]:
    """Write the plan (and its artifacts) into a temporary folder beside ``folder``, then move each
    file into ``folder``; returns the file names."""
    from compress.outputs import make_folder

    folder = make_folder(Path(folder), "--output")
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=folder))
    try:
        files = plan.save(staging / name)
        for file in files[1:] + files[:1]:  # the artifacts first, plan.json (which names them) last
            os.replace(staging / file, folder / file)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return files


def _summary(dense_counts: dict, pruned_counts: dict, plan: Plan) -> dict:
    dense, pruned = dense_counts["decoder_linear"], pruned_counts["decoder_linear"]
    return {
        "decoder_linear": {"dense": dense, "pruned": pruned},
        "pruning_ratio": 1.0 - pruned / dense if dense else 0.0,
        "steps": [{"pass": step.pass_name,
                   "layers_changed": sum(any(v is not None for k, v in vars(p).items() if k != "index")
                                         for p in step.layers)} for step in plan.steps],
    }


def _in_memory_plan(recipe, device, monitor, progress) -> tuple[Plan, dict]:
    from compress.context import PassContext
    from compress.models.encoder import is_encoder
    from compress.models.llama import get_adapter
    from compress.models.loading import load_model
    from compress.pipeline import (
        _calibration_loader,
        _heldout_loader,
        dense_loader,
        new_plan,
        resolve_device,
        run_passes,
    )

    device = resolve_device(device or recipe.device)
    with monitor.stage("load"):
        loaded = load_model(recipe.model.source, dtype=recipe.model.dtype, device=device,
                            trust_remote_code=recipe.model.trust_remote_code, progress=progress)
    if is_encoder(loaded.model):
        raise CompressError(f"{recipe.source_name}: compress plan handles decoders and ONNX models; for an encoder "
                            "run the recipe with `compress run` (its output folder holds plan.json)")
    adapter = get_adapter(loaded.model)
    dense_counts, dense_widths = adapter.param_counts(), adapter.all_widths()
    ctx = PassContext(model=loaded.model, tokenizer=loaded.tokenizer,
                      calibration_loader=_calibration_loader(recipe, loaded.tokenizer),
                      batch_size=recipe.calibration.batch_size if recipe.calibration else 16, progress=progress,
                      dense_loader=dense_loader(recipe.model.source, recipe.model.dtype, device,
                                                recipe.model.trust_remote_code),
                      heldout_loader=_heldout_loader(recipe, loaded.tokenizer))
    plan = new_plan(recipe.model.source, loaded.model, adapter, dense_widths)
    run_passes(recipe, ctx, plan, monitor)
    return plan, _summary(dense_counts, get_adapter(loaded.model).param_counts(), plan)


def _streamed_plan(recipe, monitor, progress) -> tuple[Plan, dict]:
    from compress.memory import freed_memory_returned
    from compress.outofcore_pipeline import prune_out_of_core

    with tempfile.TemporaryDirectory(prefix="compress-plan-") as scratch, freed_memory_returned():
        result, model, _tokenizer = prune_out_of_core(recipe, sink=None, offload_root=Path(scratch),
                                                      monitor=monitor, progress=progress)
    summary = _summary(result.dense_counts, model.adapter.param_counts(), result.plan)
    summary["out_of_core"] = result.section
    return result.plan, summary


def _onnx_plan(recipe, monitor, progress) -> tuple[Plan, dict]:
    import onnx

    from compress.onnx_pipeline import _check_source
    from compress.registry import get_pass
    from passes.spa.prune import OnnxPassContext

    source = _check_source(recipe.model.source)
    for entry in recipe.passes:
        if getattr(get_pass(entry.name).cls, "model_format", "hf") != "onnx":
            raise CompressError(f"passes: {entry.name!r} works on Hugging Face models, but model is an ONNX file "
                                "(passes for ONNX models: spa)")
    with monitor.stage("load"):
        try:
            model = onnx.load(str(source))
        except Exception as exc:  # onnx raises several types for a bad file
            raise CompressError(f"model: {source}: not a readable ONNX model ({exc})") from None
    ctx = OnnxPassContext(model=model, source=source, progress=progress)
    plan = Plan(model={"source": str(source), "format": "onnx"})
    for entry in recipe.passes:
        with monitor.stage(f"pass:{entry.name}"):
            plan.steps.append(get_pass(entry.name).cls(entry.options).run(ctx))
    steps = [{"pass": s.pass_name, "groups_pruned": s.details.get("groups_pruned")} for s in plan.steps]
    return plan, {"steps": steps}
