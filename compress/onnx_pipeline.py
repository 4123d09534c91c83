"""Recipes whose model is an ONNX file (``model: path/to/model.onnx``): passes that work on graphs.

Load the model with its weights, run the passes (each must declare ``model_format = "onnx"``),
write the pruned ``model.onnx`` (weights beside it in ``model.onnx.data``) with ``plan.json`` and a
report into a staging folder, check it, and rename the folder into place. The checks are gates:
``onnx.checker``, strict shape inference, and ONNX Runtime running the pruned graph on the same
synthetic inputs as the dense one; the cosine similarity of their first outputs is reported.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from compress.errors import CompressError

SYNTHETIC_BATCH, SYNTHETIC_SEQ = 2, 16


def is_onnx_source(source: str) -> bool:
    return str(source).lower().endswith(".onnx")


def synthetic_feeds(session, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for any graph: symbolic axes get batch 2 / length 16 (a KV cache's past length 0);
    ``input_ids``-like int inputs get random ids below 100, masks ones, positions a range."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in session.get_inputs():
        is_past = "past" in value.name
        shape = []
        for k, dim in enumerate(value.shape):
            if isinstance(dim, int) and dim > 0:
                shape.append(dim)
            elif k == 0:
                shape.append(SYNTHETIC_BATCH)
            else:
                shape.append(0 if is_past and k == 2 else SYNTHETIC_SEQ)
        kind = value.type
        if "int" in kind:
            dtype = np.int64 if "int64" in kind else np.int32
            if "mask" in value.name:
                array = np.ones(shape, dtype)
            elif "position" in value.name:
                array = np.broadcast_to(np.arange(shape[-1], dtype=dtype), shape).copy()
            elif "type" in value.name:
                array = np.zeros(shape, dtype)
            else:
                array = rng.integers(0, 100, size=shape).astype(dtype)
        else:
            dtype = np.float16 if "float16" in kind else np.float32
            array = rng.normal(size=shape).astype(dtype)
        feeds[value.name] = array
    return feeds


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _float_params(model) -> int:
    from passes.spa.grouping import WEIGHT_TYPES

    return sum(int(np.prod(i.dims)) for i in model.graph.initializer if i.data_type in WEIGHT_TYPES)


def _median_ms(session, feeds, runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - start) * 1000)
    return float(np.median(times))


def run_onnx_recipe(recipe, out: Path, progress: bool = True, overwrite: bool = False):
    from compress.plan import Plan
    from compress.registry import get_pass

    source = _check_source(recipe.model.source)
    for entry in recipe.passes:
        if getattr(get_pass(entry.name).cls, "model_format", "hf") != "onnx":
            raise CompressError(f"passes: {entry.name!r} works on Hugging Face models, but model is an ONNX file "
                                "(passes for ONNX models: spa)")
    if recipe.evaluate is not None:
        raise CompressError("evaluate: perplexity evaluation needs a Hugging Face model; for an ONNX model set "
                            "`evaluate: false` (the run compares the pruned graph's outputs with the dense graph's)")

    def run_passes(ctx, monitor):
        plan = Plan(model={"source": str(source), "format": "onnx"})
        reports = []
        for entry in recipe.passes:
            with monitor.stage(f"pass:{entry.name}") as record:
                step = get_pass(entry.name).cls(entry.options).run(ctx)
            plan.steps.append(step)
            reports.append({"name": entry.name, "options": entry.options.model_dump(), "wall_s": record["wall_s"],
                            "peak_rss_mb": record["peak_rss_mb"],
                            "details": {k: v for k, v in step.details.items() if k != "groups"}})
        return plan, reports

    return _prune_onnx_model(source, out, recipe.name, run_passes, recipe.validate, recipe, progress, overwrite)


def apply_onnx_plan(plan, plan_path: Path, model_source: str, out: Path, progress: bool = True,
                    overwrite: bool = False):
    """``compress apply`` for a plan made on an ONNX model: the same cuts, without data or scores."""
    from compress.plan import Plan
    from compress.recipe import ValidateSpec
    from compress.registry import get_pass

    source = _check_source(model_source)

    def replay(ctx, monitor):
        reports = []
        for step in plan.steps:
            cls = get_pass(step.pass_name).cls
            if not hasattr(cls, "replay"):
                raise CompressError(f"{plan_path}: the {step.pass_name!r} step cannot be replayed on an ONNX model")
            with monitor.stage(f"replay:{step.pass_name}"):
                cls.replay(ctx, step)
            reports.append({"name": step.pass_name, "options": step.options, "wall_s": 0.0, "peak_rss_mb": 0.0,
                            "details": {"replayed": True, **{k: v for k, v in step.details.items() if k != "groups"}}})
        return Plan(model={"source": str(source), "format": "onnx"}, steps=list(plan.steps)), reports

    return _prune_onnx_model(source, out, f"apply {Path(plan_path).name}", replay, ValidateSpec(), None, progress,
                             overwrite)


def _check_source(model_source) -> Path:
    source = Path(model_source).expanduser()
    if not source.is_file():
        raise CompressError(f"model: {source}: ONNX file not found")
    return source


def _prune_onnx_model(source: Path, out: Path, name: str, transform, validate, recipe, progress: bool,
                      overwrite: bool = False):
    """Load ``source``, let ``transform(ctx, monitor) -> (plan, pass reports)`` cut ``ctx.model``,
    and write, check and report the result in a staging folder renamed to ``out`` at the end."""
    import onnx

    from compress.monitor import StageMonitor
    from compress.outputs import OutputFolder
    from compress.pipeline import RunResult, _save_recipe_copy
    from compress.validation import failures_of, mark_result
    from passes.spa.prune import OnnxPassContext

    monitor = StageMonitor()
    staging = OutputFolder(out, overwrite=overwrite)
    try:
        with monitor.stage("load"):
            try:
                dense = onnx.load(str(source))
            except Exception as exc:
                raise CompressError(f"model: {source}: not a readable ONNX model ({exc})") from None
        dense_params = _float_params(dense)
        ctx = OnnxPassContext(model=dense, source=source, progress=progress)
        plan, pass_reports = transform(ctx, monitor)
        with monitor.stage("export"):
            target = staging.path / "model.onnx"
            onnx.save_model(ctx.model, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                            location="model.onnx.data", size_threshold=1024)
            files = [f for f in ("model.onnx", "model.onnx.data") if (staging.path / f).is_file()]
            files += plan.save(staging.path / "plan.json")
        gates, section = _validate(source, target, validate, monitor)
        pruned_params = _float_params(ctx.model)
        report = {
            "recipe": name,
            "model": str(source),
            "format": "onnx",
            "params": {"dense": {"total": dense_params}, "pruned": {"total": pruned_params},
                       "ratio": 1.0 - pruned_params / max(1, dense_params)},
            "passes": pass_reports,
            "onnx": section,
            "gates": [g.to_dict() for g in gates if g is not None],
            "stages": monitor.stages,
            "artifacts": {"files": files},
        }
        if recipe is not None:
            _save_recipe_copy(recipe, staging.path)
        (staging.path / "report.json").write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
        (staging.path / "report.md").write_text(_markdown(report), encoding="utf-8")
        failures = failures_of([g for g in gates if g is not None])
        final = staging.commit()
        mark_result(final, failures)
        return RunResult(output_dir=final, report=report, passed=not failures, failures=failures)
    except BaseException:
        staging.discard()
        raise


def _validate(dense_path: Path, pruned_path: Path, validate, monitor):
    import onnx

    from compress.validation import Gate

    gates = []
    with monitor.stage("validate onnx"):
        try:
            onnx.checker.check_model(str(pruned_path))
            onnx.shape_inference.infer_shapes_path(str(pruned_path), str(pruned_path.with_suffix(".inferred.onnx")),
                                                   strict_mode=True)
            pruned_path.with_suffix(".inferred.onnx").unlink(missing_ok=True)
            valid, problem = 1.0, ""
        except Exception as exc:  # the gate reports it
            valid, problem = 0.0, str(exc).splitlines()[0][:300]
        gates.append(Gate.check("onnx_graph_valid", valid, 1.0, ">=",
                                "onnx.checker and strict shape inference" + (f": {problem}" if problem else "")))
        dense_session, pruned_session = _session(dense_path), _session(pruned_path)
        feeds = synthetic_feeds(dense_session)
        # resizable inputs (a KV cache, empty at past length 0) take the pruned graph's own shapes
        pruned_feeds = {name: feeds[name] if name in feeds and feeds[name].shape == value.shape else value
                        for name, value in synthetic_feeds(pruned_session).items()}
        dense_out = dense_session.run(None, feeds)[0].astype(np.float64).reshape(-1)
        try:
            pruned_out = pruned_session.run(None, pruned_feeds)[0].astype(np.float64).reshape(-1)
            runs = 1.0
        except Exception as exc:
            pruned_out, runs, problem = None, 0.0, str(exc).splitlines()[0][:300]
        gates.append(Gate.check("onnx_runtime_runs", runs, 1.0, ">=",
                                "ONNX Runtime runs the pruned graph on the dense graph's inputs"
                                + (f": {problem}" if not runs else "")))
        section = {"synthetic_inputs": {k: list(v.shape) for k, v in feeds.items()}}
        if pruned_out is not None and pruned_out.shape == dense_out.shape:
            denominator = np.linalg.norm(dense_out) * np.linalg.norm(pruned_out)
            section["output_cosine_to_dense"] = float(dense_out @ pruned_out / denominator) if denominator else 1.0
            section["dense_ms"] = _median_ms(dense_session, feeds)
            section["pruned_ms"] = _median_ms(pruned_session, pruned_feeds)
    return gates, section


def _markdown(report: dict) -> str:
    p = report["params"]
    lines = [f"# {report['recipe']}", "", f"- model: `{report['model']}` (ONNX)",
             f"- float parameters: {p['dense']['total']:,} → {p['pruned']['total']:,} ({p['ratio']:.2%} removed)"]
    section = report.get("onnx", {})
    if "output_cosine_to_dense" in section:
        lines.append(f"- first output vs dense on synthetic inputs: cosine {section['output_cosine_to_dense']:.4f}")
        lines.append(f"- ONNX Runtime (CPU, median of 5): dense {section['dense_ms']:.1f} ms, pruned "
                     f"{section['pruned_ms']:.1f} ms")
    for entry in report["passes"]:
        d = entry["details"]
        lines.append(f"- {entry['name']}: {d.get('groups_pruned')} of {d.get('groups_prunable')} prunable groups cut "
                     f"({d.get('groups_found')} found)")
    lines += ["", "| gate | value | threshold | result |", "|---|---|---|---|"]
    for gate in report["gates"]:
        lines.append(f"| {gate['name']} | {gate['value']} | {gate['op']} {gate['threshold']} | "
                     f"{'pass' if gate['passed'] else 'FAIL'} |")
    return "\n".join(lines) + "\n"
