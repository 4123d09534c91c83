"""The pipeline: load ► passes ► plan ► export ► reload check ► evaluate ► gates ► report.

Everything is written into a temporary folder beside the output folder and renamed into place at
the end, so an interrupted or failed run never leaves a half-written artifact under the output
name.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from compress.context import PassContext
from compress.errors import PlanError
from compress.monitor import StageMonitor
from compress.outputs import OutputFolder
from compress.preflight import preflight
from compress.plan import Plan

RELOAD_CHECK_WINDOWS = 4
APPLY_EVAL_WINDOWS = 64  # compress apply: windows per evaluation domain
ONNX_SUBDIR = "onnx"


@dataclass
class RunResult:
    output_dir: Path
    report: dict
    passed: bool
    failures: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------- helpers
def resolve_device(device: str | None) -> str:
    """"auto" (or None) → cuda when available, else cpu; the loader's checks apply."""
    from compress.models.loading import resolve_device as resolve_torch_device

    return str(resolve_torch_device(device or "auto"))


def _widths_table(adapter, dense_widths) -> list[dict]:
    """Per layer, every width of the adapter's widths record (heads, kv_heads, intermediate, …) now
    and dense (``dense_<name>``)."""
    rows = []
    for i, (w, d) in enumerate(zip(adapter.all_widths(), dense_widths)):
        now, dense = asdict(w), asdict(d)
        rows.append({"index": i, **now, **{f"dense_{k}": v for k, v in dense.items()}})
    return rows


def _param_section(dense_counts: dict, pruned_counts: dict, target: float | None) -> dict:
    return {
        "dense": {"total": dense_counts["total"], "decoder_linear": dense_counts["decoder_linear"]},
        "pruned": {"total": pruned_counts["total"], "decoder_linear": pruned_counts["decoder_linear"]},
        "pruning_ratio": 1.0 - pruned_counts["decoder_linear"] / dense_counts["decoder_linear"],
        "total_ratio": 1.0 - pruned_counts["total"] / dense_counts["total"],
        "target_ratio": target,
    }


def _reload_max_abs_diff(model, folder: Path, windows: torch.Tensor, device: str) -> float:
    """Reload the exported folder with ``AutoModelForCausalLM`` and compare logits with ``model``."""
    from transformers import AutoModelForCausalLM

    import compress  # noqa: F401  (registers the pruned-model classes)

    dtype = next(model.parameters()).dtype
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    with torch.no_grad():
        batch = windows[:RELOAD_CHECK_WINDOWS].to(device)
        diff = (model(input_ids=batch).logits.float() - reloaded(input_ids=batch).logits.float()).abs().max()
    del reloaded
    return float(diff)


# --------------------------------------------------------------------------------- recipe
def describe_recipe(recipe, output: Path | None = None) -> list[str]:
    """What ``run`` would do, one line per step (the dry run prints these)."""
    out = Path(output) if output else Path(recipe.export.output)
    lines = [
        f"recipe    {recipe.name}",
        f"model     {recipe.model.source} ({recipe.model.dtype}, device {recipe.device}, seed {recipe.seed})",
    ]
    if recipe.calibration is not None:
        c = recipe.calibration
        lines.append(f"calibrate {c.source}: {c.samples} windows × {c.seqlen} tokens, seed {c.seed}, batch {c.batch_size}")
    for i, entry in enumerate(recipe.passes):
        opts = ", ".join(f"{k}={v}" for k, v in entry.options.model_dump().items())
        lines.append(f"pass {i + 1}    {entry.name}: {opts}")
    lines.append(f"export    {', '.join(recipe.export.formats)} → {out}")
    if "onnx" in recipe.export.formats:
        o = recipe.export.onnx
        lines.append(f"onnx      opset {o.opset}, {'fp16' if o.fp16 else 'fp32'}, slim {'on' if o.slim else 'off'} → {out / ONNX_SUBDIR}")
    if recipe.evaluate is not None:
        e = recipe.evaluate
        lines.append(
            f"evaluate  {', '.join(e.datasets)} at seqlen {e.seqlen}, first {e.max_windows} windows"
            + (" (dense too)" if e.dense else "")
        )
    v = recipe.validate
    gates = [f"reload max|Δ| ≤ {v.reload_max_abs_diff}"]
    gates += [f"{n} {op} {t}" for n, op, t in (
        ("ppl ratio", "≤", v.max_ppl_ratio), ("top-1 agreement", "≥", v.min_top1_agreement), ("mean KL", "≤", v.max_mean_kl)
    ) if t is not None]
    if "onnx" in recipe.export.formats:
        gates.append(f"ONNX vs PyTorch atol {v.onnx_atol:g} rtol {v.onnx_rtol:g}")
        if v.generation_tokens and v.generation_prompts:
            gates.append(f"{v.generation_tokens} greedy tokens identical on {len(v.generation_prompts)} prompts")
    lines.append(f"validate  {'; '.join(gates)}")
    if recipe.max_memory is not None:  # out of core: memory line, no evaluation, other gates
        from compress.outofcore_pipeline import describe_out_of_core

        lines = describe_out_of_core(recipe, lines)
    return lines


def dry_run_lines(recipe, output: Path | None = None, overwrite: bool = False) -> list[str]:
    """What ``run --dry-run`` prints: the recipe's steps, then what the checks that need no
    weights found (they raise on a missing model, a pass that does not fit it, a refused output)."""
    out = Path(output) if output else Path(recipe.export.output)
    checked = preflight(recipe, out, overwrite=overwrite)
    return describe_recipe(recipe, out) + checked.lines()


def _calibration_loader(recipe, tokenizer):
    if recipe.calibration is None:
        return None
    from compress.calibration.sources import random_windows
    from compress.calibration.token_cache import source_ids

    c = recipe.calibration

    def load() -> torch.Tensor:
        return random_windows(source_ids(tokenizer, c.source), c.samples, c.seqlen, c.seed, source=c.source,
                              field="calibration")

    return load


HELDOUT_WINDOWS = 32  # held-out calibration windows (choices made on data the statistics did not see)
HELDOUT_SEED_OFFSET = 1_000_003  # their draw's seed: calibration.seed + this


def _heldout_loader(recipe, tokenizer):
    """Held-out windows of the calibration source: ``HELDOUT_WINDOWS`` random windows drawn with
    seed ``calibration.seed + HELDOUT_SEED_OFFSET`` (a draw independent of the calibration one)."""
    if recipe.calibration is None:
        return None
    from compress.calibration.sources import random_windows
    from compress.calibration.token_cache import source_ids

    c = recipe.calibration

    def load() -> torch.Tensor:
        return random_windows(source_ids(tokenizer, c.source), HELDOUT_WINDOWS, c.seqlen,
                              (c.seed + HELDOUT_SEED_OFFSET) % (2**32), source=c.source, field="calibration")

    return load


def lm_evaluator(evaluate, validate, tokenizer, progress: bool):
    """The decoder ``evaluate`` section's evaluator (None when evaluation is off). KL is measured
    when asked for, or when a gate needs it."""
    if evaluate is None:
        return None
    from compress.evaluation.lm_evaluator import LMEvaluator

    kl = evaluate.kl or (validate is not None and validate.max_mean_kl is not None)
    return LMEvaluator(evaluate, tokenizer, kl=kl, progress=progress)


def dense_loader(source: str, dtype: str, device: str, trust_remote_code: bool = False):
    """A function that loads the dense model again (for the report's generations section)."""
    def load():
        from compress.models.loading import load_model

        return load_model(source, dtype=dtype, device=device, trust_remote_code=trust_remote_code, progress=False).model

    return load


def run_recipe(recipe, *, output: Path | None = None, dry_run: bool = False, device: str | None = None,
               progress: bool = True, overwrite: bool = False) -> RunResult:
    """Run a validated recipe end to end and write the artifact folder. An existing output is
    replaced only when compress wrote it (or with ``overwrite``): see :mod:`compress.outputs`."""
    out = Path(output) if output else Path(recipe.export.output)
    if dry_run:
        return RunResult(output_dir=out, report={"dry_run": dry_run_lines(recipe, out, overwrite)}, passed=True)
    preflight(recipe, out, overwrite=overwrite)
    if recipe.max_memory is not None:  # out of core: one block in memory at a time (docs/scale.md)
        from compress.outofcore_pipeline import run_out_of_core

        return run_out_of_core(recipe.with_overrides(device=device), out, progress=progress, overwrite=overwrite)
    from compress.onnx_pipeline import is_onnx_source, run_onnx_recipe

    if is_onnx_source(recipe.model.source):
        return run_onnx_recipe(recipe, out, progress=progress, overwrite=overwrite)

    from compress.models.llama import get_adapter
    from compress.models.loading import load_model
    from compress.registry import get_pass

    torch.manual_seed(recipe.seed)
    device = resolve_device(device or recipe.device)
    monitor = StageMonitor()
    staging = OutputFolder(out, overwrite=overwrite)
    try:
        with monitor.stage("load"):
            loaded = load_model(recipe.model.source, dtype=recipe.model.dtype, device=device,
                                trust_remote_code=recipe.model.trust_remote_code, progress=progress)
        model, tokenizer = loaded.model, loaded.tokenizer
        from compress.models.encoder import is_encoder

        if is_encoder(model):
            from compress.encoder_pipeline import run_encoder_recipe

            return run_encoder_recipe(recipe, loaded, staging, monitor, device, progress)
        from compress.pruning.token_schedule import is_llava

        if is_llava(model):
            from compress.vlm_pipeline import run_vlm_recipe

            return run_vlm_recipe(recipe, loaded, staging, monitor, device, progress)
        adapter = get_adapter(model)
        dense_counts, dense_widths = adapter.param_counts(), adapter.all_widths()
        evaluator = lm_evaluator(recipe.evaluate, recipe.validate, tokenizer, progress)
        if evaluator is not None:
            with monitor.stage("dense reference"):
                evaluator.measure_dense(model)
        load_dense = dense_loader(recipe.model.source, recipe.model.dtype, device, recipe.model.trust_remote_code)

        ctx = PassContext(model=model, tokenizer=tokenizer, calibration_loader=_calibration_loader(recipe, tokenizer),
                          batch_size=recipe.calibration.batch_size if recipe.calibration else 16, progress=progress,
                          dense_loader=load_dense, heldout_loader=_heldout_loader(recipe, tokenizer))
        if recipe.calibration is not None and any(getattr(get_pass(e.name).cls, "needs_calibration", False) for e in recipe.passes):
            with monitor.stage("calibration data"):
                ctx.calibration_ids()
        plan = new_plan(recipe.model.source, model, adapter, dense_widths)
        pass_reports = run_passes(recipe, ctx, plan, monitor)
        ctx.release_dense()
        adapter = get_adapter(model)
        target = next((e.options.ratio for e in reversed(recipe.passes) if hasattr(e.options, "ratio")), None)
        report = _base_report(recipe.name, recipe.model.source, device, recipe.model.dtype, recipe.seed,
                              dense_counts, adapter, dense_widths, target)
        report["passes"] = pass_reports
        _save_recipe_copy(recipe, staging.path)
        return _finish(report, model, tokenizer, plan, staging, monitor, evaluator, recipe.validate, device,
                       export=recipe.export, load_dense=load_dense)
    except BaseException:
        staging.discard()
        raise


def new_plan(source: str, model, adapter, dense_widths) -> Plan:
    """An empty plan for ``model`` (what ``apply`` checks: architecture, layer count, dense widths)."""
    return Plan(model={"source": source, "architecture": type(model).__name__, "num_layers": adapter.num_layers,
                       "dense_widths": [w.__dict__ for w in dense_widths]})


def run_passes(recipe, ctx, plan: Plan, monitor) -> list[dict]:
    """Run the recipe's passes in order, appending each step to ``plan``; one report entry each."""
    from compress.registry import get_pass

    pass_reports = []
    for entry in recipe.passes:
        spec = get_pass(entry.name)
        with monitor.stage(f"pass:{entry.name}") as record:
            step = spec.cls(entry.options).run(ctx)
        plan.steps.append(step)
        pass_reports.append({"name": entry.name, "options": entry.options.model_dump(),
                             "wall_s": record["wall_s"], "peak_rss_mb": record["peak_rss_mb"],
                             "details": _step_details(step)})
    return pass_reports


def _save_recipe_copy(recipe, folder: Path) -> None:
    """The recipe as run, so ``compress validate DIR`` can find its gates later."""
    import yaml

    from compress.validation import RECIPE_COPY

    data = recipe.to_dict()
    data["name"] = recipe.name
    (folder / RECIPE_COPY).write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def _step_details(step) -> dict:
    """What a pruning step changed, for the report."""
    return {
        "layers_with_heads_removed": sum(p.keep_heads is not None for p in step.layers),
        "layers_with_kv_heads_removed": sum(p.keep_kv_heads is not None for p in step.layers),
        "layers_with_channels_removed": sum(p.keep_channels is not None for p in step.layers),
        "compensation_biases": sum((p.o_proj_bias is not None) + (p.down_proj_bias is not None) for p in step.layers),
        **step.details,
    }


def _base_report(name, source, device, dtype, seed, dense_counts, adapter, dense_widths, target) -> dict:
    return {
        "recipe": name,
        "model": source,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "dtype": dtype,
        "seed": seed,
        "params": _param_section(dense_counts, adapter.param_counts(), target),
        "layers": _widths_table(adapter, dense_widths),
    }


def _finish(report, model, tokenizer, plan, staging, monitor, evaluator, validate, device, export=None,
            load_dense=None) -> RunResult:
    """Export, check the reload (and the ONNX graph), evaluate, apply the gates, write the report,
    rename into place. A failed gate still writes everything, with a ``FAILED`` marker."""
    from compress.validation import Gate, quality_gates, validate_onnx
    from exporters.safetensors import export_safetensors

    with monitor.stage("export"):
        exported = export_safetensors(model, tokenizer, staging.path)
        plan_files = plan.save(staging.path / "plan.json")
    files = sorted(exported.get("files", [])) + plan_files
    gates: list[Gate] = []
    if evaluator is not None:
        check_windows = evaluator.first_windows()
    else:
        check_windows = torch.randint(0, model.config.vocab_size, (RELOAD_CHECK_WINDOWS, 32), generator=torch.Generator().manual_seed(0))
    with monitor.stage("reload check"):
        diff = _reload_max_abs_diff(model, staging.path, check_windows, device)
    gates.append(Gate.check("reload_max_abs_diff", diff, validate.reload_max_abs_diff, "<=",
                            "in-memory model vs the safetensors export reloaded with from_pretrained"))

    if export is not None and "onnx" in export.formats:
        from exporters.onnx import OnnxExportOptions, export_onnx

        onnx_dir = staging.path / ONNX_SUBDIR
        options = OnnxExportOptions(opset=export.onnx.opset, fp16=export.onnx.fp16, slim=export.onnx.slim)
        with monitor.stage("export onnx"):
            onnx_export = export_onnx(model, tokenizer, onnx_dir, options)
        with monitor.stage("validate onnx"):
            section, onnx_gates = validate_onnx(model, tokenizer, onnx_dir, validate, check_windows, device)
        report["onnx"] = {"dir": ONNX_SUBDIR, "opset": options.opset, "dtype": onnx_export.spec.dtype,
                          "slim": options.slim, "nodes": onnx_export.nodes, "bytes": onnx_export.bytes,
                          "kv_heads": onnx_export.spec.kv_heads, "validation": section}
        files += [f"{ONNX_SUBDIR}/{name}" for name in onnx_export.files]
        gates += onnx_gates

    if evaluator is not None:
        with monitor.stage("evaluate"):
            report["evaluation"] = evaluator.evaluate(model)
        gates += quality_gates(report["evaluation"], validate)
        with monitor.stage("generations"):
            generations = evaluator.generations(model, tokenizer, list(validate.generation_prompts), load_dense)
        if generations is not None:
            report["generations"] = generations

    return conclude(report, gates, files, staging, monitor, device)


def conclude(report: dict, gates: list, files: list[str], staging: OutputFolder, monitor, device: str) -> RunResult:
    """Judge the gates, write report.json / report.md / the plot and the PASSED or FAILED marker
    into the staging folder, and rename it into place."""
    from compress.report import write_report
    from compress.validation import failures_of, mark_result

    gates = [g for g in gates if g is not None]
    failures = failures_of(gates)
    report["validation"] = {"passed": not failures, "gates": [g.to_dict() for g in gates], "device": device}
    report["stages"] = monitor.stages
    final = staging.final
    report["artifacts"] = {"dir": str(final), "files": files + ["report.json", "report.md", "kept_widths.png"]}
    write_report(staging.path, report)
    mark_result(staging.path, failures)
    staging.commit()
    return RunResult(output_dir=final, report=report, passed=not failures, failures=failures)


# --------------------------------------------------------------------------------- apply
def apply_plan(model, plan: Plan) -> None:
    """Replay every step of ``plan`` on ``model`` (no calibration data needed)."""
    from compress.models.llama import get_adapter
    from compress.pruning.surgeon import REFIT_ARTIFACT, apply_step

    adapter = get_adapter(model)
    expected = plan.model.get("num_layers")
    if expected is not None and expected != adapter.num_layers:
        raise PlanError(f"the plan is for a model with {expected} layers, this model has {adapter.num_layers}")
    dense_widths = plan.model.get("dense_widths")
    if dense_widths:
        actual = [w.__dict__ for w in adapter.all_widths()]
        if actual != dense_widths:
            raise PlanError("the plan was made for a model with other layer widths than this one")
    from compress.models.encoder import EncoderAdapter

    for step in plan.steps:
        if isinstance(adapter, EncoderAdapter):
            from compress.pruning.encoder_surgeon import apply_encoder_step

            apply_encoder_step(adapter, step)
            if "token_stages" in step.details:  # token_prune / token_merge: the stages they added
                from compress.pruning.token_schedule import install_token_pruning

                install_token_pruning(model, step.details["token_stages"],
                                      step.details["token_pruning"].get("proportional_attention", True))
            continue
        apply_step(adapter, step)  # slices, biases and least-squares refits
        if set(step.artifacts) - {REFIT_ARTIFACT} or _replays_details(step):
            _replay_artifacts(model, step)


def _replays_details(step) -> bool:
    """True for a pass whose step is replayed from its JSON details alone (e.g. moe_experts)."""
    from compress.registry import get_pass

    spec = get_pass(step.pass_name)
    return spec is not None and getattr(spec.cls, "replays_details", False)


def _replay_artifacts(model, step) -> None:
    """Re-apply a step's saved tensors (e.g. merged LoRA deltas) through its pass's ``replay``."""
    from compress.registry import get_pass

    spec = get_pass(step.pass_name)
    replay = getattr(spec.cls, "replay", None) if spec is not None else None
    if replay is None:
        raise PlanError(f"plan step {step.pass_name!r} carries artifacts ({', '.join(step.artifacts)}) "
                        "but no registered pass of that name can replay them")
    replay(model, step)


def load_plan_for_apply(plan_path: Path) -> Plan:
    """Read ``plan_path`` and check that every step names a registered pass (PlanError otherwise)."""
    from compress.recipe import unknown_pass_message
    from compress.registry import available_passes, get_pass

    plan = Plan.load(plan_path)
    for index, step in enumerate(plan.steps):
        if get_pass(step.pass_name) is None:
            raise PlanError(f"{plan_path}: step {index}: "
                            + unknown_pass_message(step.pass_name, list(available_passes())))
    return plan


def apply_plan_file(plan_path: Path, model_source: str, output: Path, *, device: str | None = None,
                    dtype: str = "float32", progress: bool = True, evaluate: bool = True,
                    overwrite: bool = False) -> RunResult:
    """``compress apply``: load the model, replay the plan, export with the reload check; with
    ``evaluate`` (decoders), also the evaluation suite on its first ``APPLY_EVAL_WINDOWS`` windows
    per domain, dense figures included (cached)."""
    from compress.recipe import EvaluateSpec, ValidateSpec
    from compress.models.llama import get_adapter
    from compress.models.loading import load_model

    from compress.onnx_pipeline import apply_onnx_plan, is_onnx_source

    plan = load_plan_for_apply(Path(plan_path))
    if plan.model.get("format") == "onnx" or is_onnx_source(model_source):
        if plan.model.get("format") != "onnx" or not is_onnx_source(model_source):
            raise PlanError(f"{plan_path}: a plan made on an ONNX model replays on an .onnx file, and only such a "
                            f"plan does (plan format: {plan.model.get('format', 'hf')}, model: {model_source})")
        return apply_onnx_plan(plan, Path(plan_path), model_source, Path(output), progress=progress,
                               overwrite=overwrite)
    device = resolve_device(device)
    monitor = StageMonitor()
    staging = OutputFolder(Path(output), overwrite=overwrite)
    try:
        with monitor.stage("load"):
            loaded = load_model(model_source, dtype=dtype, device=device, progress=progress)
        model = loaded.model
        if plan.model.get("format") == "llava":
            from compress.vlm_pipeline import apply_llava_plan

            return apply_llava_plan(model, loaded.tokenizer, plan, Path(plan_path), model_source, staging, monitor,
                                    device, dtype)
        adapter = get_adapter(model)
        dense_counts, dense_widths = adapter.param_counts(), adapter.all_widths()
        from compress.models.encoder import EncoderAdapter

        evaluator = None
        if evaluate and not isinstance(adapter, EncoderAdapter):
            evaluator = lm_evaluator(EvaluateSpec(max_windows=APPLY_EVAL_WINDOWS), None, loaded.tokenizer, progress)
            with monitor.stage("dense reference"):
                evaluator.measure_dense(model)
        with monitor.stage("apply plan"):
            try:
                apply_plan(model, plan)
            except PlanError as error:
                raise PlanError(f"{plan_path}: {error} (model: {model_source})") from None
        adapter = get_adapter(model)
        if isinstance(adapter, EncoderAdapter):
            from compress.encoder_pipeline import finish_encoder

            report = _base_report(f"apply {Path(plan_path).name}", model_source, device, dtype, None,
                                  dense_counts, adapter, dense_widths, None)
            report["passes"] = [{"name": s.pass_name, "options": s.options, "wall_s": 0.0, "peak_rss_mb": 0.0,
                                 "details": {"replayed": True, **_step_details(s)}} for s in plan.steps]
            return finish_encoder(report, model, loaded.tokenizer, plan, staging, monitor, [], None, None,
                                  ValidateSpec(), device, None)
        ratio = next((s.options.get("ratio") for s in reversed(plan.steps) if "ratio" in s.options), None)
        report = _base_report(f"apply {Path(plan_path).name}", model_source, device, dtype, None,
                              dense_counts, adapter, dense_widths, ratio)
        report["passes"] = [{"name": s.pass_name, "options": s.options, "wall_s": 0.0, "peak_rss_mb": 0.0,
                             "details": {"replayed": True, **_step_details(s)}} for s in plan.steps]

        return _finish(report, model, loaded.tokenizer, plan, staging, monitor, evaluator, ValidateSpec(), device,
                       load_dense=dense_loader(model_source, dtype, device))
    except BaseException:
        staging.discard()
        raise
