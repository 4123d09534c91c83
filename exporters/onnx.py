"""ONNX exporter for LLaMA-family and MoE decoders (dense or structurally pruned) with a KV cache.

    export_onnx(model, tokenizer, out_dir, options) -> OnnxExport

One graph serves both prefill and cached decoding (the sequence and past lengths are dynamic, the
past may be empty). Its I/O follows the names ONNX Runtime tooling expects:

    in   input_ids                     int64  [batch, seq]
    in   attention_mask                int64  [batch, past_seq + seq]    (1 = real token, 0 = padding)
    in   position_ids                  int64  [batch, seq]
    in   past_key_values.{i}.key/value float  [batch, kv_heads_i, past_seq, head_dim]
    out  logits                        float  [batch, seq, vocab]
    out  present.{i}.key/value         float  [batch, kv_heads_i, past_seq + seq, head_dim]

``kv_heads_i`` is read from layer i's modules (through the model's adapter), never from the
config: a pruned model's layers differ. ``export.json`` beside the graph records every name, shape,
dtype and per-layer head count, so a runtime can size the cache without the torch config.

MoE decoders (Mixtral, Qwen2-MoE, Qwen3-MoE, stock or with per-layer expert counts) are traced
with their sparse blocks in the static all-experts form of ``compress/models/moe_static.py`` (the
stock expert loop is data-dependent); the model passed in keeps its own blocks.

Files written into ``out_dir`` (the caller owns atomicity): ``model.onnx`` (graph),
``model.onnx.data`` (weights as external data), ``export.json``, ``genai_config.json`` (so that
onnxruntime-genai runs the folder as it is; :mod:`exporters.genai`) and the tokenizer files.
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from compress.errors import CompressError
from exporters.genai import write_genai_config

__all__ = [
    "DecoderIOSpec",
    "DecoderWithCache",
    "OnnxExport",
    "OnnxExportOptions",
    "decoder_io_spec",
    "export_onnx",
    "resolve_graph",
]

ONNX_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
SPEC_FILE = "export.json"
SPEC_FORMAT = "compress.onnx-decoder/1"
DEFAULT_OPSET = 18

# torch.export specialises sample sizes 0 and 1, so the trace uses sizes >= 2 for every dynamic dim.
_TRACE_BATCH, _TRACE_SEQ, _TRACE_PAST = 2, 3, 4
_ONNX_DTYPES = {torch.float32: "float32", torch.float16: "float16"}


@dataclass(frozen=True)
class OnnxExportOptions:
    """opset: ONNX opset of the default domain (18 unless a reason to change it).
    fp16: export float16 weights and activations (inputs/outputs of the cache are float16 too).
    slim: run onnxslim over the graph (constant folding, dead-node removal).
    graph: ``traced`` (torch.onnx, the model op for op), ``fused`` (:mod:`exporters.onnx_fused`: ONNX
    Runtime's fused attention and norms, written from the weights; LLaMA, Mistral and Qwen2 layers in
    float32) or ``auto`` (fused where it can be written, else traced). last_logits: a fused graph
    gives the last position's logits only (the generation graph).
    optimize: also run torch.onnx's own onnxscript optimizer before onnxslim. On SmolLM2 FLAP-50 it
    takes about as long as the rest of the export together, and the graph it gives (2,274 nodes
    instead of 2,677) decodes no faster in ONNX Runtime at its full optimisation level (logits
    within 6e-5); but SPA's grouping of an exported decoder needs its folded form, so it stays on
    unless a recipe turns it off."""

    opset: int = DEFAULT_OPSET
    fp16: bool = False
    slim: bool = True
    optimize: bool = True
    graph: str = "traced"  # traced | fused | auto (fused where exporters.onnx_fused writes the family, else traced)
    last_logits: bool = True  # fused graphs: logits of the last position only


@dataclass
class DecoderIOSpec:
    """The graph's contract (the content of ``export.json``).

    kv_heads[i]: KV heads of layer i; past/present key and value of layer i are
    [batch, kv_heads[i], past_seq, head_dim] in ``dtype``.
    """

    num_layers: int
    kv_heads: list[int]
    head_dim: int
    vocab_size: int
    dtype: str
    opset: int
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    model_type: str = ""
    quantization: dict | None = None  # weight-only quantization (exporters/onnx_quant.py); None = float weights
    graph: str = "traced"  # traced (torch.onnx) or fused (exporters/onnx_fused.py: no position_ids input)
    logits: str = "all"  # all: [batch, seq, vocab]; last: [batch, 1, vocab]
    files: dict = field(default_factory=lambda: {"model": ONNX_FILE, "weights": DATA_FILE})
    format: str = SPEC_FORMAT

    # --------------------------------------------------------------------------- names
    def past_names(self, layer: int) -> tuple[str, str]:
        return f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"

    def present_names(self, layer: int) -> tuple[str, str]:
        return f"present.{layer}.key", f"present.{layer}.value"

    @property
    def input_names(self) -> list[str]:
        names = ["input_ids", "attention_mask"] + (["position_ids"] if self.graph == "traced" else [])
        for i in range(self.num_layers):
            names += self.past_names(i)
        return names

    @property
    def output_names(self) -> list[str]:
        names = ["logits"]
        for i in range(self.num_layers):
            names += self.present_names(i)
        return names

    # --------------------------------------------------------------------------- (de)serialise
    def to_dict(self) -> dict:
        data = asdict(self)
        shape = lambda i, seq: ["batch", self.kv_heads[i], seq, self.head_dim]  # noqa: E731
        data["inputs"] = [
            {"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]},
            {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "past_seq + seq"]},
        ] + ([{"name": "position_ids", "dtype": "int64", "shape": ["batch", "seq"]}] if self.graph == "traced" else []) + [
            {"name": name, "dtype": self.dtype, "shape": shape(i, "past_seq")}
            for i in range(self.num_layers)
            for name in self.past_names(i)
        ]
        logits_seq = 1 if self.logits == "last" else "seq"
        data["outputs"] = [{"name": "logits", "dtype": self.dtype, "shape": ["batch", logits_seq, self.vocab_size]}] + [
            {"name": name, "dtype": self.dtype, "shape": shape(i, "past_seq + seq")}
            for i in range(self.num_layers)
            for name in self.present_names(i)
        ]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "DecoderIOSpec":
        if data.get("format") != SPEC_FORMAT:
            raise ValueError(f"not a {SPEC_FORMAT} spec (format {data.get('format')!r})")
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, folder: Path) -> "DecoderIOSpec":
        """Read and check ``folder/export.json``; anything malformed is a CompressError naming the file."""
        path = Path(folder) / SPEC_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            spec = cls.from_dict(data) if isinstance(data, dict) else None
        except (OSError, UnicodeDecodeError, ValueError, TypeError, RecursionError) as error:
            raise CompressError(f"{path}: not a readable export spec ({error})") from None
        problem = "it is not a JSON object" if spec is None else spec.problem()
        if problem:
            raise CompressError(f"{path}: not a valid export spec: {problem}; export the model again")
        return spec

    def problem(self) -> str | None:
        """What makes the spec unusable (wrong types or sizes), or None."""
        def whole(value, low=1):
            return isinstance(value, int) and not isinstance(value, bool) and value >= low

        if not whole(self.num_layers):
            return f"num_layers must be a positive whole number (got {self.num_layers!r})"
        if not isinstance(self.kv_heads, list) or len(self.kv_heads) != self.num_layers or \
                not all(whole(h, 0) for h in self.kv_heads):
            return f"kv_heads must list {self.num_layers} whole numbers (got {self.kv_heads!r})"
        for name in ("head_dim", "vocab_size", "opset"):
            if not whole(getattr(self, name)):
                return f"{name} must be a positive whole number (got {getattr(self, name)!r})"
        if self.dtype not in ("float32", "float16"):
            return f"dtype must be float32 or float16 (got {self.dtype!r})"
        if self.graph not in ("traced", "fused") or self.logits not in ("all", "last"):
            return f"graph must be traced or fused and logits all or last (got {self.graph!r}, {self.logits!r})"
        if not isinstance(self.eos_token_id, list) or not all(whole(e, 0) for e in self.eos_token_id):
            return f"eos_token_id must be a list of token ids (got {self.eos_token_id!r})"
        return None


def eos_token_ids(model: nn.Module) -> list[int]:
    generation = getattr(model, "generation_config", None)
    eos = getattr(generation, "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def _token_id(model: nn.Module, name: str) -> int | None:
    """``name`` from the generation config, else from the model config; None when neither has it."""
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, name, None)
        if isinstance(value, int):
            return value
    return None


def decoder_io_spec(model: nn.Module, options: OnnxExportOptions = OnnxExportOptions()) -> DecoderIOSpec:
    """The I/O contract of ``model``'s graph, with per-layer KV heads read from its modules."""
    from compress.models.adapters import get_adapter

    adapter = get_adapter(model)
    return DecoderIOSpec(
        num_layers=adapter.num_layers,
        kv_heads=[w.kv_heads for w in adapter.all_widths()],
        head_dim=adapter.head_dim,
        vocab_size=int(model.get_output_embeddings().weight.shape[0]),
        dtype="float16" if options.fp16 else "float32",
        opset=options.opset,
        bos_token_id=_token_id(model, "bos_token_id"),
        eos_token_id=eos_token_ids(model),
        pad_token_id=_token_id(model, "pad_token_id"),
        model_type=str(model.config.model_type),
    )


# ------------------------------------------------------------------------------- the wrapper
class DecoderWithCache(nn.Module):
    """A causal LM with flat tensor I/O: the cache goes in and out as one (key, value) pair per layer.

    forward(input_ids [b, s], attention_mask [b, p + s], position_ids [b, s],
            past_key_values: list of (key, value), each [b, kv_heads_i, p, head_dim])
        -> (logits [b, s, vocab], present_0_key, present_0_value, ..., each [b, kv_heads_i, p + s, head_dim])
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, past_key_values):
        from transformers import DynamicCache

        # Full layers everywhere (no config): every present holds the whole past, as the contract
        # says; a sliding-window layer (Mistral, Gemma 2/3) gets its window from the attention mask.
        cache = DynamicCache()
        for layer, (key, value) in enumerate(past_key_values):
            cache.update(key, value, layer)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
        )
        present = []
        for layer in out.cache.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def _trace_inputs(spec: DecoderIOSpec, dtype: torch.dtype) -> tuple:
    b, s, p = _TRACE_BATCH, _TRACE_SEQ, _TRACE_PAST
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, spec.vocab_size, (b, s), generator=generator)
    attention_mask = torch.ones(b, p + s, dtype=torch.long)
    position_ids = torch.arange(p, p + s).expand(b, s).contiguous()
    past = [
        tuple(torch.zeros(b, spec.kv_heads[i], p, spec.head_dim, dtype=dtype) for _ in range(2))
        for i in range(spec.num_layers)
    ]
    return input_ids, attention_mask, position_ids, past


def _dynamic_shapes(spec: DecoderIOSpec) -> dict:
    Dim = torch.export.Dim
    batch, seq, past_seq, total_seq = Dim("batch"), Dim("seq"), Dim("past_seq"), Dim("total_seq")
    cache_dims = {0: batch, 2: past_seq}
    return {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total_seq},
        "position_ids": {0: batch, 1: seq},
        "past_key_values": [(cache_dims, cache_dims) for _ in range(spec.num_layers)],
    }


# ------------------------------------------------------------------------------- export
@dataclass
class OnnxExport:
    """What was written: files (names relative to the folder), the spec, the graph's node count and
    the size in bytes of the graph plus its weights."""

    folder: Path
    files: list[str]
    spec: DecoderIOSpec
    nodes: int
    bytes: int


def export_onnx(model: nn.Module, tokenizer, out_dir: Path, options: OnnxExportOptions = OnnxExportOptions()) -> OnnxExport:
    """Trace ``model`` (eval mode, on the CPU) into ``out_dir``/model.onnx with external weights.

    The model is not modified. A float32 dense-block model on the CPU is traced as it is (its
    attention implementation set to sdpa for the trace and restored); otherwise a CPU copy is traced
    (float16 when ``options.fp16``; MoE blocks swapped for their static form).
    """
    import onnx

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = decoder_io_spec(model, options)
    if resolve_graph(model, options) == "fused":
        return _export_fused(model, tokenizer, out_dir, spec, options)
    dtype = torch.float16 if options.fp16 else torch.float32
    traced = model if _traceable_as_is(model, dtype) else copy.deepcopy(model).to(device="cpu", dtype=dtype)
    was_training, attention = traced.training, traced.config._attn_implementation
    traced.eval()
    _make_static(traced)
    # The SDPA path exports to plain MatMul/Softmax; "eager" would too but keeps an extra repeat_kv copy.
    # Soft-capped attention (Gemma 2) has no SDPA form and is traced eager.
    softcap = getattr(traced.config, "attn_logit_softcapping", None)
    traced.config._attn_implementation = "eager" if softcap else "sdpa"
    wrapper = DecoderWithCache(traced).eval()
    # torch.onnx logs one warning per torchvision op it cannot register; irrelevant for decoders.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".trace-") as scratch:
        raw = Path(scratch) / ONNX_FILE
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                wrapper,
                _trace_inputs(spec, dtype),
                dynamo=True,
                opset_version=options.opset,
                dynamic_shapes=_dynamic_shapes(spec),
                input_names=spec.input_names,
                output_names=spec.output_names,
                optimize=options.optimize or not options.slim,
                verbose=False,
            )
            program.save(raw, external_data=True)
        del program, wrapper
        if traced is model:
            traced.config._attn_implementation = attention
            traced.train(was_training)
        del traced
        gc.collect()
        # The weights stay in the data file torch wrote; only the graph is read, slimmed and rewritten.
        proto = onnx.load(str(raw), load_external_data=False)
        if options.slim:
            proto = _slim(proto)
        _check_contract(proto, spec)
        for stale in (out_dir / ONNX_FILE, out_dir / DATA_FILE):
            stale.unlink(missing_ok=True)
        os.replace(raw.with_name(DATA_FILE), out_dir / DATA_FILE)
        onnx.save_model(proto, str(out_dir / ONNX_FILE))
        nodes = len(proto.graph.node)
    return _finish_export(model, tokenizer, out_dir, spec, nodes)


def _finish_export(model: nn.Module, tokenizer, out_dir: Path, spec: DecoderIOSpec, nodes: int) -> OnnxExport:
    """The files beside a written graph and its weights: export.json, genai_config.json, the tokenizer."""
    # onnx writes the external data file owner-only; give it the graph file's permissions.
    (out_dir / DATA_FILE).chmod((out_dir / ONNX_FILE).stat().st_mode & 0o777)
    spec.save(out_dir / SPEC_FILE)
    files = [ONNX_FILE, DATA_FILE, SPEC_FILE, write_genai_config(out_dir, spec, model)]
    files += _write_tokenizer(tokenizer, out_dir)
    size = sum((out_dir / f).stat().st_size for f in (ONNX_FILE, DATA_FILE))
    return OnnxExport(folder=out_dir, files=files, spec=spec, nodes=nodes, bytes=size)


def resolve_graph(model: nn.Module, options: OnnxExportOptions) -> str:
    """``traced`` or ``fused``: what ``options.graph`` gives for ``model``; asking for a fused graph of a
    model it cannot hold is a CompressError that says why."""
    from exporters.onnx_fused import fused_problem

    if options.graph == "traced":
        return "traced"
    problem = "a float16 graph is traced (the fused graph is written in float32)" if options.fp16 else fused_problem(model)
    if problem and options.graph == "fused":
        raise CompressError(f"export.onnx.graph: fused: {problem}; use graph: auto or traced")
    return "traced" if problem else "fused"


def _export_fused(model: nn.Module, tokenizer, out_dir: Path, spec: DecoderIOSpec, options: OnnxExportOptions) -> OnnxExport:
    """The fused graph (:mod:`exporters.onnx_fused`) and the same files beside it as a traced export."""
    from exporters.onnx_fused import FusedOptions, write_fused_graph

    spec.graph, spec.logits = "fused", ("last" if options.last_logits else "all")
    for stale in (out_dir / ONNX_FILE, out_dir / DATA_FILE):
        stale.unlink(missing_ok=True)
    nodes = write_fused_graph(model, out_dir, spec, FusedOptions(last_logits=options.last_logits), ONNX_FILE, DATA_FILE)
    return _finish_export(model, tokenizer, out_dir, spec, nodes)


def _traceable_as_is(model: nn.Module, dtype: torch.dtype) -> bool:
    """True when tracing ``model`` itself changes nothing in it: on the CPU, in ``dtype``, no MoE."""
    from compress.models.moe import is_moe_model

    parameter = next(model.parameters())
    return parameter.device.type == "cpu" and parameter.dtype == dtype and not is_moe_model(model)


def _make_static(model: nn.Module) -> None:
    """MoE decoders: replace the data-dependent expert loops with the static all-experts form
    (compress/models/moe_static.py) on the copy being traced; other models are left as they are."""
    from compress.models.moe import is_moe_model

    if is_moe_model(model):
        from compress.models.moe_static import install_static_moe_blocks

        install_static_moe_blocks(model)


def _slim(proto):
    """onnxslim over the graph alone: every weight kept in external data is shown to onnxslim as a
    graph input of the same type and shape, so it folds shapes and constants and removes dead
    nodes without reading or copying the weights (a few MB instead of three copies of them), then
    the weights are initializers again (those the slimmed graph still reads)."""
    import onnxslim
    from onnx import ModelProto, TensorProto, helper

    weights = {t.name: t for t in proto.graph.initializer if t.data_location == TensorProto.EXTERNAL}
    light = ModelProto()
    light.CopyFrom(proto)
    inline = [t for t in light.graph.initializer if t.name not in weights]
    del light.graph.initializer[:]
    light.graph.initializer.extend(inline)
    light.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in weights.values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        slim = onnxslim.slim(light)
    inputs = [i for i in slim.graph.input if i.name not in weights]
    del slim.graph.input[:]
    slim.graph.input.extend(inputs)
    read = {name for node in slim.graph.node for name in node.input} | {o.name for o in slim.graph.output}
    slim.graph.initializer.extend(t for name, t in weights.items() if name in read)
    return slim


def _check_contract(proto, spec: DecoderIOSpec) -> None:
    """The graph's opset and I/O names are the ones ``spec`` promises (torch may change both)."""
    opsets = {entry.domain: entry.version for entry in proto.opset_import}
    if opsets.get("", opsets.get("ai.onnx")) != spec.opset:
        raise RuntimeError(f"exported graph has opset {opsets}, expected {spec.opset} for the default domain")
    inputs = [i.name for i in proto.graph.input]
    outputs = [o.name for o in proto.graph.output]
    if inputs != spec.input_names or outputs != spec.output_names:
        raise RuntimeError(f"exported graph I/O names differ from the spec: {inputs[:4]}… / {outputs[:3]}…")


def _write_tokenizer(tokenizer, out_dir: Path) -> list[str]:
    if tokenizer is None:
        return []
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer.save_pretrained(scratch)
        names = sorted(path.name for path in Path(scratch).iterdir())
        for name in names:
            shutil.copy2(Path(scratch) / name, out_dir / name)
    return names
