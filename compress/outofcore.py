"""Out-of-core structured pruning: the model never has to fit in memory, only one block of it.

    StreamingModel(folder, dtype)     the causal LM as a module tree on the meta device; block i is
                                      materialised from the memory-mapped safetensors on demand
                                      (``materialise(i)``) and dropped back to meta (``release(i)``)
    StreamedBlocks(model, ...)        the block source a ``StructuredPruner`` sweeps out of core
                                      (compress.pruning.blocks): the same scorer, allocator, plan
                                      and surgeon calls as in memory, in the same order, so the
                                      plan and the weights are identical
    out_of_core_problems(recipe, …)   what cannot run this way (passes declare ``streams``)

Sweeps (``StructuredPruner``'s, one code for both block sources):
  * data-free (magnitude): scores read from the weights; uniform allocation decides each block
    alone (one sweep); global allocation needs every block's scores first (two sweeps);
  * calibrated, uniform (wanda_sp, flap ul-um): one sweep, each block observed, planned, sliced,
    written and freed; ``sequential`` runs the pruned block to feed the next;
  * calibrated, global (flap al-am): sweep 1 observes every block on the dense model and keeps
    the statistics and unit scores (small: a few vectors per layer); the allocator then sees every
    layer; sweep 2 re-reads each block from the checkpoint to plan (compensation biases need its
    weights), slice and write it; with ``sequential`` sweep 2 re-observes each block on the pruned
    upstream blocks first.

A block holds its weights (views of the file mapping) while it is materialised; after slicing the
pruned tensors go to the ``sink`` (the sharded writer) and the block returns to the meta device
with its pruned shapes, so at the end the meta model describes the pruned architecture: parameter
counts, widths and the export config come from it without any weights.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch

from compress.calibration.streaming import DiskActivations, MemoryActivations, StreamingRunner
from compress.checkpoint import CheckpointReader
from compress.errors import CompressError, ModelSourceError
from compress.memory import MemoryBudget, forward_bytes, release_memory, resident_bytes
from compress.pruning.blocks import layer_sweep
from compress.registry import available_passes, get_pass

EMBEDDING_CHUNK_BYTES = 64 * 2**20  # embedding rows read (and large tensors copied) this much at a time


class StreamingModel:
    """A LLaMA-family causal LM whose weights stay in its safetensors checkpoint.

    Args:
        folder: a folder with config.json and model.safetensors (or shards + index).
        dtype: the dtype blocks are materialised in (the run's dtype).
        device: where materialised blocks and activations live.
        trust_remote_code: allow the folder's own code (for configs that need it).
    """

    def __init__(self, folder: Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 trust_remote_code: bool = False):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

        import compress  # noqa: F401  (registers pruned_llama with the Auto classes)
        from compress.models.adapters import get_adapter
        from compress.models.families import DECODER_FAMILIES
        from compress.models.llama import LlamaFamilyAdapter
        from compress.models.phi3 import PHI3_MODEL_TYPE

        self.folder = Path(folder)
        self.dtype = dtype
        self.device = torch.device(device)
        try:
            config = AutoConfig.from_pretrained(self.folder, trust_remote_code=trust_remote_code, local_files_only=True)
            with init_empty_weights():
                model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa",
                                                         trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as error:
            raise ModelSourceError(f"{self.folder}: cannot build the model from its config.json ({error})") from None
        model.tie_weights()
        model.eval()
        if (self.folder / "generation_config.json").is_file():  # as from_pretrained does
            model.generation_config = GenerationConfig.from_pretrained(self.folder, local_files_only=True)
        if config.model_type == PHI3_MODEL_TYPE:
            raise CompressError(f"{self.folder}: out-of-core pruning reads blocks as the checkpoint stores them, and "
                                "Phi-3's fused qkv_proj / gate_up_proj are unfused only when the whole model is "
                                "loaded; run it without max_memory")
        adapter = get_adapter(model)
        if type(adapter) is not LlamaFamilyAdapter:
            raise CompressError(f"out-of-core pruning supports the decoder families "
                                f"({', '.join(t for t in DECODER_FAMILIES if t != PHI3_MODEL_TYPE)}); "
                                f"{self.folder} is a {config.model_type} model")
        self.model = model
        self.adapter = adapter
        model.model.rotary_emb.to(self.device)
        self.reader = CheckpointReader(self.folder)
        names = {id(module): name for name, module in model.named_modules()}
        self.layer_names = [names[id(layer)] for layer in adapter.layers]
        self.embedding_name = f"{names[id(adapter.decoder.embed_tokens)]}.weight"
        self._check_tensors()

    # ------------------------------------------------------------------ checkpoint
    def block_keys(self, i: int) -> list[str]:
        """Parameter names of block ``i`` relative to the block (``self_attn.q_proj.weight``, ...)."""
        return list(self.adapter.layers[i].state_dict().keys())

    def _check_tensors(self) -> None:
        expected = [f"{prefix}.{key}" for i, prefix in enumerate(self.layer_names) for key in self.block_keys(i)]
        expected += self.other_tensor_names()
        missing = [name for name in expected if name not in self.reader]
        if missing:
            raise ModelSourceError(f"{self.folder}: the checkpoint lacks {len(missing)} tensor(s) the config "
                                   f"implies, e.g. {', '.join(missing[:3])}")
        shapes = self.model.state_dict()
        wrong = [name for name in expected if tuple(shapes[name].shape) != self.reader.info(name).shape]
        if wrong:
            name = wrong[0]
            raise ModelSourceError(f"{self.folder}: tensor {name} is {list(self.reader.info(name).shape)} in the "
                                   f"checkpoint but {list(shapes[name].shape)} by config.json")

    def other_tensor_names(self) -> list[str]:
        """The tensors outside the decoder blocks (embedding, final norm, an untied lm_head)."""
        blocks = tuple(f"{prefix}." for prefix in self.layer_names)
        tied = self.tied
        names = []
        for name in self.model.state_dict():
            if name.startswith(blocks):
                continue
            if tied and name == "lm_head.weight":
                continue
            names.append(name)
        return names

    @property
    def tied(self) -> bool:
        return self.model.get_output_embeddings().weight is self.model.get_input_embeddings().weight

    def block_bytes(self, i: int) -> int:
        """Bytes of block ``i``'s dense weights in the run's dtype (from the headers)."""
        return self.reader.nbytes([f"{self.layer_names[i]}.{key}" for key in self.block_keys(i)], self.dtype)

    # ------------------------------------------------------------------ blocks
    def materialise(self, i: int) -> torch.nn.Module:
        """Load block ``i``'s weights from the checkpoint into the block (in place) and return it."""
        block = self.adapter.layers[i]
        prefix = self.layer_names[i]
        tensors = self.reader.read([f"{prefix}.{key}" for key in self.block_keys(i)], self.dtype)
        state = {name[len(prefix) + 1:]: tensor.to(self.device) for name, tensor in tensors.items()}
        del tensors
        block.load_state_dict(state, strict=True, assign=True)
        return block

    def block_state(self, i: int) -> dict[str, torch.Tensor]:
        """The materialised (possibly pruned) block ``i``'s tensors under their checkpoint names."""
        prefix = self.layer_names[i]
        return {f"{prefix}.{key}": tensor.detach() for key, tensor in self.adapter.layers[i].state_dict().items()}

    def release(self, i: int) -> None:
        """Return block ``i`` to the meta device (keeping its shapes) and free its memory."""
        self.adapter.layers[i].to("meta")
        release_memory(collect=False)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """[len(ids), hidden] input embeddings: the rows gathered from the checkpoint chunk by chunk,
        times the embedding module's own scale where it has one (Gemma's sqrt(hidden))."""
        rows = self.reader.gather_rows(self.embedding_name, ids, EMBEDDING_CHUNK_BYTES, self.dtype)
        scale = getattr(self.adapter.decoder.embed_tokens, "embed_scale", None)
        return rows if scale is None else rows * scale.to(device=rows.device, dtype=rows.dtype)

    # ------------------------------------------------------------------ memory
    def budget(self, windows: tuple[int, int] | None, batch_size: int, statistics: bool) -> MemoryBudget:
        """What a sweep holds at its peak for calibration ``windows`` = (n, seqlen) (None: data-free)."""
        a = self.adapter
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        block = max(self.block_bytes(i) for i in range(a.num_layers))
        # scoring and compensation read a consumer weight in float64 (and square it): 2 copies
        consumer = max(max(a.attention_consumer(i).weight.numel(), a.mlp_consumer(i).weight.numel())
                       for i in range(a.num_layers))
        scoring = 2 * consumer * 8
        widths = a.widths(0)
        if windows is None:
            return MemoryBudget(base=resident_bytes(), block=block, forward=scoring, activations=0,
                                batch_activations=0)
        n, seqlen = windows
        b = min(batch_size, n)
        forward = forward_bytes(b * seqlen, b, seqlen, a.hidden_size, widths.heads * a.head_dim,
                                widths.kv_heads * a.head_dim, max(w.intermediate for w in a.all_widths()),
                                widths.heads, itemsize, statistics)
        forward = max(forward, scoring)
        per_window = seqlen * a.hidden_size * itemsize
        # the embedding rows of the distinct tokens are held while block 0's inputs are captured
        return MemoryBudget(base=resident_bytes(), block=block, forward=forward,
                            activations=n * per_window + min(n * seqlen, EMBEDDING_CHUNK_BYTES // itemsize),
                            batch_activations=b * per_window)


class StreamedBlocks:
    """The block source of an out-of-core run (see compress.pruning.blocks): a ``StructuredPruner``
    visits each block of a ``StreamingModel`` materialised from the checkpoint, and emits it pruned
    to ``sink`` before it is freed.

    Args:
        model: the streaming model.
        calibration: returns the calibration windows [n, seqlen] (None for data-free passes).
        batch_size: windows per block forward.
        offload: a folder for the activations (``DiskActivations``), or None to keep them in RAM.
        sink: called with each pruned block's tensors (checkpoint names) before it is freed; None
            writes nothing (``compress plan``).
        progress: show progress bars.
    """

    UNSUPPORTED = {"block_budget": "allocator block_budget", "search": "allocator search",
                   "least_squares": "compensation least_squares"}

    def __init__(self, model: StreamingModel, calibration: Callable[[], torch.Tensor] | None, batch_size: int,
                 offload: Path | None, sink: Callable[[dict[str, torch.Tensor]], None] | None, progress: bool = True):
        self.model = model
        self.calibration = calibration
        self.batch_size = batch_size
        self.offload = Path(offload) if offload is not None else None
        self.sink = sink
        self.progress = progress
        self.block_seconds: list[dict] = []  # one record per block visit: sweep, layer, seconds
        self._runs = 0

    def check(self, settings) -> None:
        """Refuse what needs the whole model or a full weight refit per layer."""
        for setting in (settings.allocator, settings.compensation):
            if setting in self.UNSUPPORTED:
                raise CompressError(f"{self.UNSUPPORTED[setting]} does not run out of core (it needs the whole "
                                    "model or a full weight refit per layer); drop --max-memory or choose another")

    def sweep(self, adapter, description: str) -> Iterator[int]:
        return layer_sweep(adapter, description, self.progress)

    @contextmanager
    def visit(self, sweep: str, i: int):
        """Materialise block ``i`` for the ``with`` body, time it, and free it afterwards."""
        start = time.perf_counter()
        self.model.materialise(i)
        try:
            yield
        finally:
            self.model.release(i)
            self.block_seconds.append({"sweep": sweep, "layer": i, "seconds": round(time.perf_counter() - start, 3)})

    def emit(self, i: int) -> None:
        if self.sink is not None:
            self.sink(self.model.block_state(i))

    def runner(self, adapter, heldout: bool) -> StreamingRunner:
        """A runner whose activations live in RAM or on disk (out of core runs no held-out windows)."""
        if self.calibration is None:
            raise CompressError("this pass needs calibration data; add a `calibration:` section to the recipe")
        self._runs += 1
        if self.offload is not None:
            store = DiskActivations(self.offload / f"activations-{self._runs}", self.model.device)
        else:
            store = MemoryActivations()
        runner = StreamingRunner(adapter, self.calibration(), self.model.embed, store, self.batch_size,
                                 self.model.device)
        runner.capture_inputs()  # before any block is materialised: the embedding rows come and go first
        release_memory()
        return runner


def out_of_core_problems(recipe, entries) -> list[tuple[tuple, str]]:
    """``(YAML path, message)`` for each part of ``recipe`` (with pass ``entries``) that cannot run
    out of core; empty when it can."""
    problems: list[tuple[tuple, str]] = []
    streaming = ", ".join(name for name, spec in available_passes().items() if spec.streams)
    source = str(recipe.model.source).lower()
    if source.endswith((".gguf", ".onnx")):
        problems.append((("model", "source"), "out of core (max_memory) reads a folder of safetensors, not a "
                         f"{Path(source).suffix} file; save the model with save_pretrained() first"))
    if len(entries) != 1:
        problems.append((("passes",), f"out of core (max_memory) runs exactly one pruning pass (got {len(entries)}); "
                         f"one of: {streaming}"))
    for index, entry in enumerate(entries):
        if not get_pass(entry.name).streams:
            problems.append((("passes", index), f"pass {entry.name} does not run out of core (max_memory); passes "
                             f"that do: {streaming}"))
            continue
        for option, value in (("allocator", getattr(entry.options, "allocator", None)),
                              ("compensation", getattr(entry.options, "compensation", None))):
            if value in StreamedBlocks.UNSUPPORTED:
                problems.append((("passes", index, entry.name, option),
                                 f"{value} does not run out of core (max_memory): it needs the whole model or a full "
                                 "weight refit per layer"))
    if "onnx" in recipe.export.formats:
        problems.append((("export", "formats"), "onnx export needs the whole model in memory; out of core "
                         "(max_memory) writes safetensors only"))
    return problems
