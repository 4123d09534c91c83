"""The deployment graph of a LLaMA-family decoder, written op by op with ONNX Runtime's fused kernels.

    fused_problem(model) -> str | None                       why this model has no fused graph
    write_fused_graph(model, out_dir, spec, options) -> int  the graph and its weights; node count
    full_logits_twin(proto) -> ModelProto                    the same graph with logits at every position

:mod:`exporters.onnx` traces the PyTorch model: the graph is exactly the model, and it is the one the
parity gates check op for op, but every norm, rotary embedding and attention is a dozen plain ops.
This module writes instead the graph onnxruntime-genai's model builder writes for a dense model,
for any per-layer widths, straight from the weights (no trace):

* one packed q/k/v ``MatMul`` per layer feeding ``com.microsoft.GroupQueryAttention`` (rotary
  inside it, from cos/sin tables computed by the model's own rotary module; causal and
  sliding-window masking from ``seqlens_k``; one node per layer, so each layer has its own query and
  KV head counts);
* ``com.microsoft.SkipSimplifiedLayerNormalization`` for every RMSNorm after the first (the residual
  add fused into the norm; the first, with no residual to add, is written in plain ops);
* SiLU as ``x * Sigmoid(x)`` (ONNX Runtime fuses it), the MLP as three MatMuls;
* the biases a pruned model carries (FLAP's compensation on o_proj and down_proj, Qwen2's q/k/v);
* ``logits: last``: only the last position's logits ([batch, 1, vocab]), which is all a generation
  step reads (onnxruntime-genai recognises the static 1); ``full_logits_twin`` gives the validator
  the same graph and weights with logits at every position.

I/O (names as :mod:`exporters.onnx`, no ``position_ids``: GroupQueryAttention derives positions from
the mask)::

    in   input_ids                     int64  [batch, seq]
    in   attention_mask                int64  [batch, past_seq + seq]   (right-aligned real tokens)
    in   past_key_values.{i}.key/value float  [batch, kv_heads_i, past_seq, head_dim]
    out  logits                        float  [batch, 1 or seq, vocab]
    out  present.{i}.key/value         float  [batch, kv_heads_i, past_seq + seq, head_dim]

The presents grow by ``seq`` when the past is passed as its own buffer (our ONNX Runtime loop);
onnxruntime-genai shares one preallocated buffer between past and present
(``past_present_share_buffer: true``), which GroupQueryAttention writes in place.

Weights are streamed into ``model.onnx.data`` one tensor at a time, so the export holds no second
copy of the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from compress.models.families import FUSED_ONNX_FAMILIES

__all__ = ["FusedOptions", "full_logits_twin", "fused_problem", "write_fused_graph"]

_ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # cos/sin that do not depend on the sequence length
LAST_POSITION = "last_position"  # name prefix of the nodes that keep only the last position's hidden state
MS_DOMAIN = "com.microsoft"
_ALIGN = 64


@dataclass(frozen=True)
class FusedOptions:
    """last_logits: logits of the last position only (the generation graph); False gives every
    position. max_positions: rows of the rotary cos/sin tables (the model's context length when
    None)."""

    last_logits: bool = True
    max_positions: int | None = None


def family_of(config) -> str:
    return str(getattr(config, "base_model_type", None) or config.model_type)


def fused_problem(model: nn.Module) -> str | None:
    """Why ``model`` cannot be written as a fused graph (None when it can)."""
    config = model.config
    family = family_of(config)
    if family not in FUSED_ONNX_FAMILIES:  # config model_type, or a pruned_llama's base_model_type
        return f"the fused ONNX graph is written for {', '.join(FUSED_ONNX_FAMILIES)} decoders, not {family!r}"
    rotary = getattr(model.model, "rotary_emb", None)
    rope_type = getattr(rotary, "rope_type", "default")
    if rotary is None or rope_type not in _ROPE_TYPES:
        return f"rotary embedding {rope_type!r} depends on the sequence length; the fused graph holds fixed tables"
    head_dim = int(model.model.layers[0].self_attn.head_dim)
    inv_freq = getattr(rotary, "inv_freq", None)
    if head_dim % 16:
        return f"head_dim {head_dim}: ONNX Runtime's GroupQueryAttention needs a multiple of 16"
    if getattr(model.model, "embed_scale", None) is not None or getattr(config, "embedding_multiplier", None):
        return "scaled embeddings are not written in the fused graph"
    if inv_freq is None or 2 * inv_freq.numel() != head_dim:
        return "partial rotary embeddings are not written in the fused graph"
    if getattr(config, "hidden_act", "silu") not in ("silu", "swish"):
        return f"MLP activation {config.hidden_act!r}: the fused graph writes SiLU"
    return None


# ------------------------------------------------------------------------------- the writer
class _GraphWriter:
    """Nodes, inline constants, and initializers streamed into one external data file."""

    def __init__(self, data_path: Path):
        self.data_path = Path(data_path)
        self.file = open(self.data_path, "wb")  # noqa: SIM115 - closed in close()
        self.nodes: list = []
        self.initializers: list = []

    def close(self) -> None:
        self.file.close()

    def weight(self, name: str, array: np.ndarray) -> str:
        """An initializer kept in the data file (aligned), read without loading it into the graph."""
        array = np.ascontiguousarray(array)
        offset = self.file.tell()
        pad = (-offset) % _ALIGN
        if pad:
            self.file.write(b"\0" * pad)
            offset += pad
        data = array.tobytes()
        self.file.write(data)
        tensor = TensorProto()
        tensor.name = name
        tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        tensor.dims.extend(array.shape)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.data_path.name), ("offset", str(offset)), ("length", str(len(data)))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.initializers.append(tensor)
        return name

    def const(self, name: str, array) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], name: str, outputs: int | list[str] = 1, domain: str = "",
             **attributes) -> list[str]:
        names = outputs if isinstance(outputs, list) else [f"{name}/output_{k}" for k in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, names, name=name, domain=domain or None, **attributes))
        return names


def _array(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to(device="cpu", dtype=torch.float32).numpy()


def _linear(writer: _GraphWriter, x: str, name: str, weights: list[nn.Linear]) -> str:
    """x @ [W1; W2; ...]^T (+ their biases): one MatMul over the concatenated output rows."""
    weight = np.concatenate([_array(linear.weight) for linear in weights], axis=0).T  # [in, out]
    out = writer.node("MatMul", [x, writer.weight(f"{name}.weight", weight)], name)[0]
    if any(linear.bias is not None for linear in weights):
        bias = np.concatenate([_array(linear.bias) if linear.bias is not None
                               else np.zeros(linear.out_features, np.float32) for linear in weights])
        out = writer.node("Add", [out, writer.weight(f"{name}.bias", bias)], f"{name}/bias")[0]
    return out


class _Residual:
    """The residual stream: a value, or a value plus a pending delta that the next norm adds in
    (SkipSimplifiedLayerNormalization) before normalising."""

    def __init__(self, value: str):
        self.value, self.delta = value, None

    def norm(self, writer: _GraphWriter, weight: str, eps: float, name: str) -> str:
        if self.delta is None:  # plain ops (a contrib op in the default domain fails onnx.checker)
            x = self.value
            square = writer.node("Mul", [x, x], f"{name}/square")[0]
            mean = writer.node("ReduceMean", [square, writer.const(f"{name}/axes", np.array([-1], np.int64))],
                               f"{name}/mean", keepdims=1)[0]
            shifted = writer.node("Add", [mean, writer.const(f"{name}/eps", np.array(eps, np.float32))], f"{name}/eps")[0]
            inverse = writer.node("Reciprocal", [writer.node("Sqrt", [shifted], f"{name}/sqrt")[0]], f"{name}/inverse")[0]
            scaled = writer.node("Mul", [x, inverse], f"{name}/scaled")[0]
            return writer.node("Mul", [scaled, weight], name)[0]
        normed, _, _, total = writer.node("SkipSimplifiedLayerNormalization", [self.value, self.delta, weight],
                                          name, outputs=4, domain=MS_DOMAIN, epsilon=eps)
        self.value, self.delta = total, None
        return normed

    def add_constant(self, writer: _GraphWriter, bias: str, name: str) -> None:
        """Add a [hidden] constant (the bias of a block with no units left) to the stream."""
        if self.delta is None:
            self.value = writer.node("Add", [self.value, bias], name)[0]
        else:
            self.delta = writer.node("Add", [self.delta, bias], name)[0]

    def add(self, delta: str) -> None:
        if self.delta is not None:
            raise RuntimeError("two pending deltas")  # every block normalises before it writes one
        self.delta = delta


def _rotary_tables(model: nn.Module, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [positions, head_dim / 2] from the model's own rotary module (its scaling included)."""
    rotary = model.model.rotary_emb
    inv = rotary.inv_freq
    ids = torch.arange(positions, device=inv.device).unsqueeze(0)
    probe = torch.zeros(1, dtype=torch.float32, device=inv.device)
    with torch.no_grad():
        cos, sin = rotary(probe, ids)
    half = cos.shape[-1] // 2
    return _array(cos[0, :, :half]), _array(sin[0, :, :half])


def write_fused_graph(model: nn.Module, out_dir: Path, spec, options: FusedOptions = FusedOptions(),
                      onnx_file: str = "model.onnx", data_file: str = "model.onnx.data") -> int:
    """Write the fused graph of ``model`` (float32) and its weights into ``out_dir``; ``spec`` is its
    :class:`exporters.onnx.DecoderIOSpec`. Returns the node count. The caller owns atomicity."""
    from compress.models.adapters import get_adapter

    problem = fused_problem(model)
    if problem:
        raise ValueError(problem)
    adapter = get_adapter(model)
    config = model.config
    head_dim, eps = adapter.head_dim, float(config.rms_norm_eps)
    positions = int(options.max_positions or getattr(config, "max_position_embeddings", 0) or 4096)
    out_dir = Path(out_dir)
    writer = _GraphWriter(out_dir / data_file)
    try:
        cos, sin = _rotary_tables(model, positions)
        writer.weight("cos_cache", cos)
        writer.weight("sin_cache", sin)
        one = writer.const("const/one", np.array([1], np.int64))
        total = writer.node("ReduceSum", ["attention_mask", one], "mask/total", keepdims=0)[0]
        seqlens = writer.node("Cast", [writer.node("Sub", [total, one], "mask/last")[0]], "mask/seqlens_k",
                              to=TensorProto.INT32)[0]
        width = writer.node("Gather", [writer.node("Shape", ["attention_mask"], "mask/shape")[0],
                                       writer.const("const/one_scalar", np.array(1, np.int64))], "mask/width", axis=0)[0]
        total_length = writer.node("Cast", [width], "mask/total_sequence_length", to=TensorProto.INT32)[0]

        embedding = model.get_input_embeddings().weight
        embed = writer.weight("model.embed_tokens.weight", _array(embedding))
        stream = _Residual(writer.node("Gather", [embed, "input_ids"], "embed_tokens")[0])
        layer_types = getattr(config, "layer_types", None) or []
        window = getattr(config, "sliding_window", None)
        for i, layer in enumerate(model.model.layers):
            widths = adapter.widths(i)
            past, present = spec.past_names(i), spec.present_names(i)
            prefix = f"layers.{i}"
            attn = layer.self_attn
            if widths.heads:
                x = stream.norm(writer, writer.weight(f"{prefix}.input_layernorm.weight",
                                                      _array(layer.input_layernorm.weight)), eps, f"{prefix}/input_layernorm")
                qkv = _linear(writer, x, f"{prefix}.attn.qkv_proj", [attn.q_proj, attn.k_proj, attn.v_proj])
                sliding = i < len(layer_types) and layer_types[i] == "sliding_attention" and window
                if not layer_types and family_of(config) == "mistral" and window:
                    sliding = True
                out = writer.node(
                    "GroupQueryAttention",
                    [qkv, "", "", past[0], past[1], seqlens, total_length, "cos_cache", "sin_cache"],
                    f"{prefix}/attn", outputs=[f"{prefix}/attn/output_0", present[0], present[1]], domain=MS_DOMAIN,
                    num_heads=widths.heads, kv_num_heads=widths.kv_heads, scale=float(attn.scaling),
                    do_rotary=1, rotary_interleaved=0, local_window_size=int(window) if sliding else -1)[0]
                stream.add(_linear(writer, out, f"{prefix}.attn.o_proj", [attn.o_proj]))
            else:  # no attention left: the cache passes through unchanged (it has 0 heads); a bias stays
                for source, target in zip(past, present):
                    writer.node("Identity", [source], f"{prefix}/attn/{target}", outputs=[target])
                if attn.o_proj.bias is not None:
                    stream.add_constant(writer, writer.weight(f"{prefix}.attn.o_proj.bias", _array(attn.o_proj.bias)),
                                        f"{prefix}/attn/o_proj/bias")
            if widths.intermediate:
                mlp = layer.mlp
                x = stream.norm(writer, writer.weight(f"{prefix}.post_attention_layernorm.weight",
                                                      _array(layer.post_attention_layernorm.weight)), eps,
                                f"{prefix}/post_attention_layernorm")
                gate = _linear(writer, x, f"{prefix}.mlp.gate_proj", [mlp.gate_proj])
                up = _linear(writer, x, f"{prefix}.mlp.up_proj", [mlp.up_proj])
                sigmoid = writer.node("Sigmoid", [gate], f"{prefix}/mlp/act/sigmoid")[0]
                act = writer.node("Mul", [gate, sigmoid], f"{prefix}/mlp/act")[0]
                hidden = writer.node("Mul", [act, up], f"{prefix}/mlp/gated")[0]
                stream.add(_linear(writer, hidden, f"{prefix}.mlp.down_proj", [mlp.down_proj]))
            elif layer.mlp.down_proj.bias is not None:  # no MLP channels left: only down_proj's bias
                stream.add_constant(writer, writer.weight(f"{prefix}.mlp.down_proj.bias",
                                                          _array(layer.mlp.down_proj.bias)), f"{prefix}/mlp/down_proj/bias")

        if options.last_logits:  # keep the last position of the residual (and its pending delta)
            starts, ends, axes = (writer.const(f"const/{k}", np.array([v], np.int64))
                                  for k, v in (("minus_one", -1), ("int_max", np.iinfo(np.int64).max), ("axis_1", 1)))
            stream.value = writer.node("Slice", [stream.value, starts, ends, axes], f"{LAST_POSITION}/residual")[0]
            if stream.delta is not None:
                stream.delta = writer.node("Slice", [stream.delta, starts, ends, axes], f"{LAST_POSITION}/delta")[0]
        hidden = stream.norm(writer, writer.weight("model.norm.weight", _array(model.model.norm.weight)), eps, "norm")
        head = model.get_output_embeddings()
        if head.weight is embedding:  # tied: the head reads the embedding (ONNX Runtime folds the transpose)
            head_weight = writer.node("Transpose", [embed], "lm_head/transpose", perm=[1, 0])[0]
        else:
            head_weight = writer.weight("lm_head.weight", _array(head.weight).T)
        bias = getattr(head, "bias", None)
        logits = writer.node("MatMul", [hidden, head_weight], "lm_head", outputs=["logits"] if bias is None else 1)[0]
        if bias is not None:
            writer.node("Add", [logits, writer.weight("lm_head.bias", _array(bias))], "lm_head/bias", outputs=["logits"])
    finally:
        writer.close()

    dtype = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total_seq"])]
    outputs = [helper.make_tensor_value_info("logits", dtype, ["batch", 1 if options.last_logits else "seq",
                                                              spec.vocab_size])]
    for i, heads in enumerate(spec.kv_heads):
        inputs += [helper.make_tensor_value_info(name, dtype, ["batch", heads, "past_seq", head_dim])
                   for name in spec.past_names(i)]
        outputs += [helper.make_tensor_value_info(name, dtype, ["batch", heads, "total_seq", head_dim])
                    for name in spec.present_names(i)]
    graph = helper.make_graph(writer.nodes, "compress-fused-decoder", inputs, outputs, writer.initializers)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", spec.opset),
                                                    helper.make_opsetid(MS_DOMAIN, 1)],
                              producer_name="compress")
    proto.ir_version = min(proto.ir_version, 10)
    onnx.save_model(proto, str(out_dir / onnx_file))
    return len(proto.graph.node)


def full_logits_twin(proto):
    """A copy of the fused graph ``proto`` with the last-position slices removed: logits
    [batch, seq, vocab] from the same weights (what the parity gates compare with PyTorch)."""
    twin = onnx.ModelProto()
    twin.CopyFrom(proto)
    sliced = {node.output[0]: node.input[0] for node in twin.graph.node if node.name.startswith(LAST_POSITION)}
    if not sliced:
        return twin
    keep = [node for node in twin.graph.node if not node.name.startswith(LAST_POSITION)]
    for node in keep:
        for k, name in enumerate(node.input):
            if name in sliced:
                node.input[k] = sliced[name]
    del twin.graph.node[:]
    twin.graph.node.extend(keep)
    logits = next(o for o in twin.graph.output if o.name == "logits")
    logits.type.tensor_type.shape.dim[1].Clear()
    logits.type.tensor_type.shape.dim[1].dim_param = "seq"
    return twin
