"""The out-of-core run: ``compress run RECIPE --max-memory 8GiB`` (or ``max_memory:`` in the recipe).

    load (meta model + checkpoint index) ► calibration windows ► memory budget ► the pass, block by
    block, each pruned block written as a shard ► embedding / norm / lm_head copied in chunks ►
    config, index, tokenizer, plan.json ► structure check ► report

Everything goes into a staging folder renamed into place at the end, like the in-memory run, and
the output loads with ``AutoModelForCausalLM.from_pretrained`` exactly as the in-memory export does
(the same config choice, :func:`exporters.safetensors.select_config`; sharded weights with
``model.safetensors.index.json``). What needs the whole model in memory is not done: the logits
reload check (replaced by a structure check of the written files against their config) and the
evaluation; the report lists them under ``out_of_core.skipped``.
"""

from __future__ import annotations

import resource
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from compress.context import PassContext
from compress.errors import CompressError
from compress.memory import MIB, format_size, freed_memory_returned, release_memory

SKIPPED_EVALUATION = ("evaluate: perplexity and agreement need the whole model in memory; measure the output "
                      "with `compress eval OUTPUT` on a machine it fits")
SKIPPED_RELOAD = ("reload_max_abs_diff: the logits check loads the whole model; replaced by reload_structure "
                  "(config.json rebuilds exactly the written tensors)")


@dataclass
class StreamingContext(PassContext):
    """A PassContext whose structured pruner runs through ``streaming`` (an OutOfCorePruner)."""

    streaming: object = None


@dataclass
class OutOfCoreResult:
    """What a streamed pass produced: the plan, the pass reports, and the run's memory figures."""

    plan: object
    pass_reports: list[dict]
    dense_counts: dict
    dense_widths: list
    section: dict = field(default_factory=dict)


def check_out_of_core(recipe) -> None:
    """Raise a CompressError naming the field when ``recipe`` cannot run out of core."""
    from compress.outofcore import out_of_core_problems
    from compress.recipe import yaml_path

    problems = out_of_core_problems(recipe, recipe.passes)
    if problems:
        raise CompressError("\n".join(f"{recipe.source_name}: {yaml_path(loc)}: {message}" for loc, message in problems))


def model_folder(source: str, progress: bool) -> Path:
    """The safetensors folder of a model source (the embedded model's cache, a folder, a cached hub id)."""
    from compress.models.loading import resolve_source

    kind, path = resolve_source(source, progress=progress)
    if kind not in ("embedded", "folder", "hub"):
        raise CompressError(f"model.source: out of core reads a folder of safetensors; {source} is a {kind} source")
    return Path(path)


def prune_out_of_core(recipe, *, sink, offload_root: Path, monitor, progress: bool):
    """Load ``recipe``'s model as a streaming model, check the memory budget, and run its pass block by
    block, giving each pruned block's tensors to ``sink`` (None: plan only). Activations go to
    ``recipe.offload_dir`` when set, else to ``offload_root`` when they do not fit in RAM.
    Returns (OutOfCoreResult, the StreamingModel, whose meta model now has the pruned shapes, the tokenizer)."""
    from transformers import AutoTokenizer

    from compress.memory import parse_size
    from compress.models.loading import resolve_dtype
    from compress.outofcore import OutOfCorePruner, StreamingModel
    from compress.pipeline import _calibration_loader, _step_details, new_plan, resolve_device
    from compress.registry import get_pass

    check_out_of_core(recipe)
    torch.manual_seed(recipe.seed)
    cap = parse_size(int(recipe.max_memory))
    device = resolve_device(recipe.device)
    entry = recipe.passes[0]
    needs_data = bool(getattr(get_pass(entry.name).cls, "needs_calibration", False))
    with monitor.stage("load"):
        folder = model_folder(recipe.model.source, progress)
        model = StreamingModel(folder, resolve_dtype(recipe.model.dtype), device, recipe.model.trust_remote_code)
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=recipe.model.trust_remote_code,
                                                      local_files_only=True)
        except (OSError, ValueError, TypeError) as error:
            raise CompressError(f"model.source: no tokenizer in {folder} ({error})") from None
    batch_size = recipe.calibration.batch_size if recipe.calibration else 16
    ctx = StreamingContext(model=model.model, tokenizer=tokenizer, batch_size=batch_size, progress=progress,
                           calibration_loader=_calibration_loader(recipe, tokenizer) if needs_data else None)
    windows = None
    if needs_data:
        with monitor.stage("calibration data"):
            windows = tuple(ctx.calibration_ids().shape)
    release_memory()
    budget = model.budget(windows, batch_size, statistics=needs_data)
    offload = budget.decide(cap, offload_requested=recipe.offload_dir is not None) and needs_data
    offload_dir = None
    if offload:
        parent = Path(recipe.offload_dir) if recipe.offload_dir else Path(offload_root)
        parent.mkdir(parents=True, exist_ok=True)
        offload_dir = Path(tempfile.mkdtemp(prefix="compress-activations-", dir=parent))
    adapter = model.adapter
    dense_counts, dense_widths = adapter.param_counts(), adapter.all_widths()
    plan = new_plan(recipe.model.source, model.model, adapter, dense_widths)
    driver = OutOfCorePruner(model, ctx.calibration_ids if needs_data else None, batch_size, offload_dir, sink,
                             progress)
    ctx.streaming = driver
    try:
        with monitor.stage(f"pass:{entry.name}") as record:
            step = get_pass(entry.name).cls(entry.options).run(ctx)
    finally:
        if offload_dir is not None:
            shutil.rmtree(offload_dir, ignore_errors=True)
    plan.steps.append(step)
    reports = [{"name": entry.name, "options": entry.options.model_dump(), "wall_s": record["wall_s"],
                "peak_rss_mb": record["peak_rss_mb"], "details": _step_details(step)}]
    section = {
        "max_memory_mb": round(cap / MIB, 1),
        "activations": ("disk" if offload else "ram") if needs_data else "none (data-free)",
        "offload_dir": str(offload_dir.parent) if offload_dir is not None else None,
        "calibration_windows": list(windows) if windows else None,
        "budget": budget.to_dict(),
        "block_seconds": driver.block_seconds,
        "seconds_per_block": _mean_by_sweep(driver.block_seconds),
    }
    return OutOfCoreResult(plan, reports, dense_counts, dense_widths, section), model, tokenizer


def _mean_by_sweep(records: list[dict]) -> dict[str, float]:
    sweeps: dict[str, list[float]] = {}
    for record in records:
        sweeps.setdefault(record["sweep"], []).append(record["seconds"])
    return {sweep: round(sum(values) / len(values), 3) for sweep, values in sweeps.items()}


def run_out_of_core(recipe, out: Path, *, progress: bool = True, overwrite: bool = False):
    """Run ``recipe`` out of core into ``out``; returns the pipeline's RunResult."""
    check_out_of_core(recipe)
    with freed_memory_returned():
        return _run_out_of_core(recipe, Path(out), progress, overwrite)


def _run_out_of_core(recipe, out: Path, progress: bool, overwrite: bool):
    from compress.checkpoint import ShardedWriter
    from compress.monitor import StageMonitor
    from compress.outputs import OutputFolder
    from compress.pipeline import _base_report, _save_recipe_copy, conclude, resolve_device

    monitor = StageMonitor()
    staging = OutputFolder(out, overwrite=overwrite)
    try:
        writer = ShardedWriter(staging.path)
        result, model, tokenizer = prune_out_of_core(recipe, sink=writer.add, offload_root=staging.path,
                                                     monitor=monitor, progress=progress)
        with monitor.stage("export"):
            files = write_rest(model, writer, tokenizer, staging.path)
            files += result.plan.save(staging.path / "plan.json")
        with monitor.stage("reload check"):
            matches, detail = written_structure(staging.path)
        device = resolve_device(recipe.device)
        target = next((e.options.ratio for e in reversed(recipe.passes) if hasattr(e.options, "ratio")), None)
        report = _base_report(recipe.name, recipe.model.source, device, recipe.model.dtype, recipe.seed,
                              result.dense_counts, model.adapter, result.dense_widths, target)
        report["passes"] = result.pass_reports
        peak = max(stage["peak_rss_mb"] for stage in monitor.stages)
        section = dict(result.section, peak_rss_mb=peak,
                       process_max_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
        section["skipped"] = [SKIPPED_RELOAD] + ([SKIPPED_EVALUATION] if recipe.evaluate is not None else [])
        report["out_of_core"] = section
        _save_recipe_copy(recipe, staging.path)
        gates = out_of_core_gates(matches, detail, peak, section["max_memory_mb"])
        return conclude(report, gates, files, staging, monitor, device)
    except BaseException:
        staging.discard()
        raise


def out_of_core_gates(matches: bool, detail: str, peak_rss_mb: float, cap_mb: float) -> list:
    from compress.validation import Gate

    return [
        Gate.check("reload_structure", 1.0 if matches else 0.0, 1.0, ">=", detail),
        Gate.check("peak_rss_mb", peak_rss_mb, cap_mb, "<=",
                   "resident memory of this process while it ran (sampled every 50 ms) vs max_memory"),
    ]


def write_rest(model, writer, tokenizer, folder: Path) -> list[str]:
    """After the blocks: the other tensors (large ones copied in chunks), the zero biases the config
    needs, the shard index, config.json (the in-memory exporter's choice), the remote code for a
    pruned config, generation_config.json and the tokenizer. Returns the file names written."""
    from compress.checkpoint import StreamedTensor
    from compress.outofcore import EMBEDDING_CHUNK_BYTES
    from exporters.safetensors import (
        needs_remote_code,
        read_layout,
        select_config,
        write_config,
        write_generation_config,
        write_remote_code,
        write_tokenizer,
        zero_biases,
    )

    reader, dtype = model.reader, model.dtype
    small = {}
    for name in model.other_tensor_names():
        info = reader.info(name)
        if info.nbytes(dtype) > EMBEDDING_CHUNK_BYTES:
            writer.add({name: StreamedTensor(dtype, info.shape, _row_chunks(reader, name, dtype))})
        else:
            small[name] = reader.read([name], dtype)[name].clone()
    layout = read_layout(model.model)
    config, bias_linears, _reason = select_config(model.model, layout)
    small.update(zero_biases(model.model, layout, bias_linears, present=set(writer.names)))
    writer.add(small)
    files = writer.finish()
    if needs_remote_code(config):
        files += write_remote_code(folder)
    files += write_config(config, folder)
    files += write_generation_config(model.model, folder)
    files += write_tokenizer(tokenizer, folder)
    return sorted(set(files))


def _row_chunks(reader, name: str, dtype):
    """``chunks()`` for a StreamedTensor: the tensor's rows, EMBEDDING_CHUNK_BYTES at a time."""
    from compress.outofcore import EMBEDDING_CHUNK_BYTES

    def chunks():
        for _start, rows in reader.row_chunks(name, EMBEDDING_CHUNK_BYTES, dtype):
            yield rows

    return chunks


def written_structure(folder: Path) -> tuple[bool, str]:
    """(True, detail) when the folder's config.json builds, on the meta device, a model whose
    tensors are exactly the written ones with the same shapes (a tied lm_head is not written)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    import compress  # noqa: F401  (registers pruned_llama)
    from compress.checkpoint import CheckpointReader

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    with init_empty_weights():
        rebuilt = AutoModelForCausalLM.from_config(config)
    rebuilt.tie_weights()
    expected = {name: tuple(t.shape) for name, t in rebuilt.state_dict().items()}
    if rebuilt.get_output_embeddings().weight is rebuilt.get_input_embeddings().weight:
        expected.pop("lm_head.weight", None)
    written = {name: info.shape for name, info in CheckpointReader(folder).infos.items()}
    missing = sorted(set(expected) - set(written))
    extra = sorted(set(written) - set(expected))
    shapes = sorted(name for name in set(expected) & set(written) if expected[name] != written[name])
    if missing or extra or shapes:
        return False, (f"config.json vs written tensors: missing {missing[:3]}, unexpected {extra[:3]}, "
                       f"other shapes {shapes[:3]}")
    return True, f"config.json ({type(config).__name__}) rebuilds exactly the {len(written)} written tensors"


def describe_out_of_core(recipe, lines: list[str]) -> list[str]:
    """The dry run's lines (``describe_recipe``) adjusted for an out-of-core run: the memory line
    before the export, the evaluation marked as skipped, the gates that are checked."""
    where = f"on disk in {recipe.offload_dir}" if recipe.offload_dir else "in RAM, on disk if they do not fit"
    cap = format_size(int(recipe.max_memory))
    adjusted = []
    for line in lines:
        if line.startswith("export"):
            adjusted.append(f"memory    out of core under {cap}; activations {where}")
        if line.startswith("evaluate"):
            line = "evaluate  skipped out of core (it needs the whole model): compress eval the output"
        if line.startswith("validate"):
            line = f"validate  reload structure (config.json vs the written tensors); peak RSS ≤ {cap}"
        adjusted.append(line)
    return adjusted


# --------------------------------------------------------------------------------- apply
def apply_out_of_core(plan_path: Path, model_source: str, output: Path, *, max_memory: int, dtype: str = "float32",
                      device: str | None = None, progress: bool = True, overwrite: bool = False):
    """``compress apply PLAN --model M -o DIR --max-memory SIZE``: replay a plan block by block
    (each block read, sliced by every step of the plan in turn, written and freed). Same weights as
    the in-memory ``apply``; no evaluation. Plans of structured pruning steps (with least-squares
    refits) only."""
    from compress.errors import PlanError
    from compress.pipeline import load_plan_for_apply, resolve_device
    from compress.pruning.surgeon import REFIT_ARTIFACT

    plan = load_plan_for_apply(Path(plan_path))
    if plan.model.get("format") in ("onnx", "encoder"):
        raise PlanError(f"{plan_path}: out of core replays decoder plans, not {plan.model['format']} plans")
    for step in plan.steps:
        extra = sorted(set(step.artifacts) - {REFIT_ARTIFACT})
        if extra or "token_stages" in step.details or step.pass_name == "moe_experts":
            raise PlanError(f"{plan_path}: step {step.pass_name!r} cannot be replayed out of core "
                            f"({'artifacts ' + ', '.join(extra) if extra else 'it changes more than layer widths'}); "
                            "drop --max-memory")
    with freed_memory_returned():
        return _apply_out_of_core(plan, Path(plan_path), model_source, Path(output), max_memory, dtype,
                                  resolve_device(device), progress, overwrite)


def _apply_out_of_core(plan, plan_path: Path, model_source: str, output: Path, max_memory: int, dtype: str,
                       device: str, progress: bool, overwrite: bool):
    from compress.checkpoint import ShardedWriter
    from compress.errors import PlanError
    from compress.models.loading import resolve_dtype
    from compress.monitor import StageMonitor
    from compress.outofcore import StreamingModel
    from compress.outputs import OutputFolder
    from compress.pipeline import _base_report, _step_details, conclude
    from compress.progress import progress_bar
    from compress.pruning.surgeon import REFIT_ARTIFACT, apply_layer_plan

    monitor = StageMonitor()
    staging = OutputFolder(output, overwrite=overwrite)
    try:
        with monitor.stage("load"):
            model = StreamingModel(model_folder(model_source, progress), resolve_dtype(dtype), device)
        adapter = model.adapter
        dense_counts, dense_widths = adapter.param_counts(), adapter.all_widths()
        if plan.model.get("num_layers", adapter.num_layers) != adapter.num_layers:
            raise PlanError(f"{plan_path}: the plan is for a model with {plan.model['num_layers']} layers, "
                            f"{model_source} has {adapter.num_layers}")
        if plan.model.get("dense_widths") and plan.model["dense_widths"] != [w.__dict__ for w in dense_widths]:
            raise PlanError(f"{plan_path}: the plan was made for a model with other layer widths than {model_source}")
        release_memory()
        budget = model.budget(None, 1, statistics=False)
        budget.decide(max_memory, offload_requested=False)
        writer = ShardedWriter(staging.path)
        by_layer = [{p.index: p for p in step.layers} for step in plan.steps]
        seconds = []
        with monitor.stage("apply plan"):
            for i in progress_bar(range(adapter.num_layers), "replaying blocks", enabled=progress):
                start = time.perf_counter()
                model.materialise(i)
                for step, layers in zip(plan.steps, by_layer):
                    if i in layers:
                        apply_layer_plan(adapter, layers[i], step.artifacts.get(REFIT_ARTIFACT))
                writer.add(model.block_state(i))
                model.release(i)
                seconds.append({"sweep": "apply", "layer": i, "seconds": round(time.perf_counter() - start, 3)})
        tokenizer = _tokenizer_or_none(model.folder)
        with monitor.stage("export"):
            files = write_rest(model, writer, tokenizer, staging.path) + plan.save(staging.path / "plan.json")
        with monitor.stage("reload check"):
            matches, detail = written_structure(staging.path)
        ratio = next((s.options.get("ratio") for s in reversed(plan.steps) if "ratio" in s.options), None)
        report = _base_report(f"apply {Path(plan_path).name}", model_source, device, dtype, None, dense_counts,
                              adapter, dense_widths, ratio)
        report["passes"] = [{"name": s.pass_name, "options": s.options, "wall_s": 0.0, "peak_rss_mb": 0.0,
                             "details": {"replayed": True, **_step_details(s)}} for s in plan.steps]
        peak = max(stage["peak_rss_mb"] for stage in monitor.stages)
        report["out_of_core"] = {"max_memory_mb": round(max_memory / MIB, 1), "budget": budget.to_dict(),
                                 "block_seconds": seconds, "seconds_per_block": _mean_by_sweep(seconds),
                                 "peak_rss_mb": peak, "skipped": [SKIPPED_RELOAD, SKIPPED_EVALUATION]}
        gates = out_of_core_gates(matches, detail, peak, round(max_memory / MIB, 1))
        return conclude(report, gates, files, staging, monitor, device)
    except BaseException:
        staging.discard()
        raise


def _tokenizer_or_none(folder: Path):
    """The folder's tokenizer, or None when it has none (the output then has no tokenizer files)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError):
        return None
