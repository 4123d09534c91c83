"""Decoders out of core (``--max-memory 8GiB`` or ``max_memory:``): one block in memory at a time.

The decoder's stages with another execution: the model is a meta model over its checkpoint
(:class:`compress.outofcore.StreamingModel`); the pass runs block by block and each pruned block is
written as a shard as soon as it is final (the sink); the export writes the rest (embedding, norm,
lm_head in chunks, config, index, tokenizer). What needs the whole model in memory is not done: the
logits reload check (replaced by a structure check of the written files against their config) and
the evaluation; the report lists them under ``out_of_core.skipped``.
"""

from __future__ import annotations

import contextlib
import resource
import shutil
import tempfile
import time
from pathlib import Path

from compress.context import PassContext
from compress.errors import CompressError, PlanError
from compress.gates import Gate
from compress.kinds.decoder import DecoderKind, calibration_loader
from compress.memory import MIB, format_size, freed_memory_returned, parse_size, release_memory
from compress.models.loading import resolve_dtype, resolve_source
from compress.registry import get_pass

SKIPPED_EVALUATION = ("evaluate: perplexity and agreement need the whole model in memory; measure the output "
                      "with `compress eval OUTPUT` on a machine it fits")
SKIPPED_RELOAD = ("reload_max_abs_diff: the logits check loads the whole model; replaced by reload_structure "
                  "(config.json rebuilds exactly the written tensors)")


def check_out_of_core(recipe) -> None:
    """Raise a CompressError naming the field when ``recipe`` cannot run out of core."""
    from compress.outofcore import out_of_core_problems
    from compress.recipe import yaml_path

    problems = out_of_core_problems(recipe, recipe.passes)
    if problems:
        raise CompressError("\n".join(f"{recipe.source_name}: {yaml_path(loc)}: {message}" for loc, message in problems))


def check_plan_out_of_core(plan, plan_path: Path) -> None:
    """Out of core replays plans of structured steps (with least-squares refits) only."""
    from compress.pruning.surgeon import REFIT_ARTIFACT

    if plan.model.get("format") in ("onnx", "encoder", "llava"):
        raise PlanError(f"{plan_path}: out of core replays decoder plans, not {plan.model['format']} plans")
    for step in plan.steps:
        extra = sorted(set(step.artifacts) - {REFIT_ARTIFACT})
        if extra or "token_stages" in step.details or get_pass(step.pass_name).replays_details:
            raise PlanError(f"{plan_path}: step {step.pass_name!r} cannot be replayed out of core "
                            f"({'artifacts ' + ', '.join(extra) if extra else 'it changes more than layer widths'}); "
                            "drop --max-memory")


def model_folder(source: str, progress: bool) -> Path:
    """The safetensors folder of a model source (the embedded model's cache, a folder, a cached hub id)."""
    kind, path = resolve_source(source, progress=progress)
    if kind not in ("embedded", "folder", "hub"):
        raise CompressError(f"model.source: out of core reads a folder of safetensors; {source} is a {kind} source")
    return Path(path)


def mean_by_sweep(records: list[dict]) -> dict[str, float]:
    sweeps: dict[str, list[float]] = {}
    for record in records:
        sweeps.setdefault(record["sweep"], []).append(record["seconds"])
    return {sweep: round(sum(values) / len(values), 3) for sweep, values in sweeps.items()}


def tokenizer_of(folder: Path, trust_remote_code: bool, required: bool):
    """The folder's tokenizer; without one, None (``required``: a CompressError)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code, local_files_only=True)
    except Exception as error:  # missing or damaged tokenizer files
        if required:
            raise CompressError(f"model.source: no tokenizer in {folder} ({error})") from None
        return None


class StreamedDecoderKind(DecoderKind):
    """The decoder kind, executed block by block under a memory cap (``state.max_memory`` bytes)."""

    streamed = True
    quantizes_onnx = False  # it writes no ONNX
    writes_gguf = False

    @classmethod
    def describe_evaluation(cls, e) -> str:
        return "skipped out of core (it needs the whole model): compress eval the output"

    @classmethod
    def describe_execution(cls, recipe) -> str | None:
        where = f"on disk in {recipe.offload_dir}" if recipe.offload_dir else "in RAM, on disk if they do not fit"
        return f"out of core under {format_size(int(recipe.max_memory))}; activations {where}"

    @classmethod
    def describe_gates(cls, v, export) -> list[str]:
        return ["reload structure (config.json vs the written tensors)", "peak RSS ≤ max_memory"]

    def __init__(self, state):
        super().__init__(state)
        self.streaming = None  # the StreamingModel
        self.writer = None  # ShardedWriter into the staging folder (None: plan only)
        self.driver = None
        self.section: dict = {}
        self.offload_dir: Path | None = None
        self.scratch: tempfile.TemporaryDirectory | None = None
        self.exits = contextlib.ExitStack()

    # -------------------------------------------------------------------------- before passes
    def load(self) -> None:
        from compress.outofcore import StreamingModel

        s = self.state
        if s.recipe is not None:
            check_out_of_core(s.recipe)
        else:
            check_plan_out_of_core(s.plan, s.plan_path)
        self.exits.enter_context(freed_memory_returned())
        with s.stage("load"):
            folder = model_folder(s.source, s.progress)
            self.streaming = StreamingModel(folder, resolve_dtype(s.dtype), s.device, s.trust_remote_code)
            s.tokenizer = tokenizer_of(folder, s.trust_remote_code, required=s.recipe is not None)
        s.model = self.streaming.model
        self.adapter = self.streaming.adapter

    def reference(self) -> None:
        self.dense_counts, self.dense_widths = self.adapter.param_counts(), self.adapter.all_widths()

    def pass_context(self) -> PassContext:
        from compress.checkpoint import ShardedWriter
        from compress.outofcore import StreamedBlocks

        s = self.state
        recipe = s.recipe
        cap = parse_size(s.max_memory)
        entry = recipe.passes[0]
        needs_data = get_pass(entry.name).needs_calibration
        batch_size = recipe.calibration.batch_size if recipe.calibration else 16
        ctx = PassContext(model=s.model, tokenizer=s.tokenizer, batch_size=batch_size, progress=s.progress,
                               calibration_loader=calibration_loader(recipe.calibration, s.tokenizer) if needs_data else None)
        windows = None
        if needs_data:
            with s.stage("calibration data"):
                windows = tuple(ctx.calibration_ids().shape)
        release_memory()
        budget = self.streaming.budget(windows, batch_size, statistics=needs_data)
        offload = budget.decide(cap, offload_requested=recipe.offload_dir is not None) and needs_data
        if offload:
            parent = Path(recipe.offload_dir) if recipe.offload_dir else self.scratch_folder()
            parent.mkdir(parents=True, exist_ok=True)
            self.offload_dir = Path(tempfile.mkdtemp(prefix="compress-activations-", dir=parent))
        self.writer = ShardedWriter(s.folder) if s.staging is not None else None
        self.driver = StreamedBlocks(self.streaming, ctx.calibration_ids if needs_data else None, batch_size,
                                     self.offload_dir, self.writer.add if self.writer is not None else None,
                                     s.progress)
        ctx.blocks = self.driver
        self.section = {
            "max_memory_mb": round(cap / MIB, 1),
            "activations": ("disk" if offload else "ram") if needs_data else "none (data-free)",
            "offload_dir": str(self.offload_dir.parent) if self.offload_dir is not None else None,
            "calibration_windows": list(windows) if windows else None,
            "budget": budget.to_dict(),
        }
        return ctx

    def scratch_folder(self) -> Path:
        """Where activations go when they do not fit in RAM: the staging folder (a plan: a temporary one)."""
        if self.state.staging is not None:
            return self.state.folder
        self.scratch = tempfile.TemporaryDirectory(prefix="compress-plan-")
        return Path(self.scratch.name)

    def after_passes(self) -> None:
        if self.offload_dir is not None:
            shutil.rmtree(self.offload_dir, ignore_errors=True)
        self.section.update(block_seconds=self.driver.block_seconds,
                            seconds_per_block=mean_by_sweep(self.driver.block_seconds))

    def cleanup(self) -> None:
        if self.scratch is not None:
            self.scratch.cleanup()
        self.exits.close()

    def replay(self, plan) -> None:
        """Each block read, sliced by every step of the plan in turn, written and freed."""
        from compress.checkpoint import ShardedWriter
        from compress.progress import progress_bar
        from compress.pruning.surgeon import REFIT_ARTIFACT, apply_layer_plan
        from compress.replay import check_plan_fits

        s = self.state
        check_plan_fits(plan, self.adapter)
        release_memory()
        budget = self.streaming.budget(None, 1, statistics=False)
        budget.decide(s.max_memory, offload_requested=False)
        self.writer = ShardedWriter(s.folder)
        by_layer = [{p.index: p for p in step.layers} for step in plan.steps]
        seconds = []
        for i in progress_bar(range(self.adapter.num_layers), "replaying blocks", enabled=s.progress):
            start = time.perf_counter()
            self.streaming.materialise(i)
            for step, layers in zip(plan.steps, by_layer):
                if i in layers:
                    apply_layer_plan(self.adapter, layers[i], step.artifacts.get(REFIT_ARTIFACT))
            self.writer.add(self.streaming.block_state(i))
            self.streaming.release(i)
            seconds.append({"sweep": "apply", "layer": i, "seconds": round(time.perf_counter() - start, 3)})
        self.section = {"max_memory_mb": round(s.max_memory / MIB, 1), "budget": budget.to_dict(),
                        "block_seconds": seconds, "seconds_per_block": mean_by_sweep(seconds)}

    # -------------------------------------------------------------------------- after passes
    def report_header(self) -> dict:
        header = super().report_header()
        header["out_of_core"] = self.section
        return header

    def export(self) -> None:
        s = self.state
        with s.stage("export"):
            s.files += write_rest(self.streaming, self.writer, s.tokenizer, s.folder)
            s.files += s.plan.save(s.folder / "plan.json")

    def reload_check(self) -> None:
        s = self.state
        with s.stage("reload check"):
            matches, detail = written_structure(s.folder)
        peak = max(stage["peak_rss_mb"] for stage in s.monitor.stages)
        section = s.report["out_of_core"]
        section.update(peak_rss_mb=peak,
                       process_max_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                       skipped=[SKIPPED_RELOAD] + ([SKIPPED_EVALUATION] if s.evaluate is not None else []))
        s.gate(Gate.check("reload_structure", 1.0 if matches else 0.0, 1.0, ">=", detail),
               Gate.check("peak_rss_mb", peak, section["max_memory_mb"], "<=",
                          "resident memory of this process while it ran (sampled every 50 ms) vs max_memory"))

    def onnx(self) -> None:
        """Not out of core: the ONNX export traces the whole model (out_of_core_problems refuses it)."""

    def evaluate(self) -> None:
        """Skipped: see SKIPPED_EVALUATION."""


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

    import compress.models  # noqa: F401  (registers pruned_llama)
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


__all__ = ["StreamedDecoderKind", "check_out_of_core"]
