"""GGUF for llama.cpp: a dense or structurally pruned LLaMA-family decoder as one ``model.gguf``.

    export_gguf(model, tokenizer, out_dir, options, tokenizer_gguf=None) -> GgufExport

Architecture by the model's shape, read from its modules through the adapter:

* ``llama`` when every layer has the same query heads, KV heads and MLP width and no linear has a
  bias: stock llama.cpp, and every tool that reads llama GGUFs, loads it;
* ``deci`` (llama.cpp's per-layer LLaMA, from Nemotron-NAS) otherwise: per-layer
  ``head_count``, ``head_count_kv`` and ``feed_forward_length`` arrays, and the ``attn_output`` /
  ``ffn_down`` biases FLAP's compensation adds. llama.cpp's ``llama`` graph sizes every layer
  from layer 0, so a pruned model with per-layer widths must be ``deci``.

Tensors follow llama.cpp's names (``blk.{i}.attn_q.weight`` …); q and k rows are permuted per
layer, with that layer's head counts, from the Hugging Face rotary layout (halves) to llama.cpp's
(interleaved pairs). A tied LM head is not written (llama.cpp then reads ``token_embd``).

``options.dtype``: f32, f16, q8_0 or q4_0 for the 2-D weights (``gguf``'s own quantizer; a weight
whose input width is not a multiple of the 32-element block is written in f16 instead, which GGUF
allows per tensor); norms and biases stay f32. Tokenizer metadata is copied from
``tokenizer_gguf`` when the model came from a GGUF file (the embedded SmolLM2), else built from a
BPE ``tokenizer.json`` (``tokenizer.ggml.model`` gpt2). A model GGUF cannot hold (another family,
a layer with every head or channel removed, a tokenizer that is not BPE) is refused with a
CompressError before any file is written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compress.errors import CompressError
from compress.models.families import GGUF_FAMILIES

__all__ = ["GGUF_FILE", "GgufExport", "GgufOptions", "export_gguf", "gguf_problem"]

GGUF_FILE = "model.gguf"
GGUF_DTYPES = ("f32", "f16", "q8_0", "q4_0")
GGUF_MODEL_TYPES = GGUF_FAMILIES
_BLOCK = 32


@dataclass(frozen=True)
class GgufOptions:
    """dtype: f32, f16, q8_0 or q4_0 (2-D weights; norms and biases stay f32)."""

    dtype: str = "f16"


@dataclass
class GgufExport:
    """What was written: the file name, the architecture, per-type tensor counts and the size."""

    folder: Path
    files: list[str]
    architecture: str
    tensor_types: dict
    bytes: int


@dataclass
class _Layer:
    heads: int
    kv_heads: int
    ffn: int
    modules: nn.Module


def gguf_problem(model: nn.Module) -> str | None:
    """Why ``model`` cannot be written as GGUF, or None."""
    model_type = getattr(model.config, "base_model_type", None) or model.config.model_type
    if model_type not in GGUF_MODEL_TYPES:  # a pruned_llama is judged by its base family
        return (f"GGUF export writes LLaMA-family decoders ({', '.join(GGUF_MODEL_TYPES)}); this model is "
                f"{model_type!r}")
    for index, layer in enumerate(_layers(model)):
        if layer.heads == 0 or layer.kv_heads == 0 or layer.ffn == 0:
            return (f"layer {index} has {layer.heads} query heads, {layer.kv_heads} KV heads and {layer.ffn} MLP "
                    "channels; llama.cpp's per-layer architecture cannot load an emptied attention or MLP here: "
                    "keep at least one (the pass's min_heads / min_channels)")
        if layer.heads % layer.kv_heads:
            return f"layer {index}: {layer.heads} query heads do not split evenly over {layer.kv_heads} KV heads"
    return None


def export_gguf(model: nn.Module, tokenizer, out_dir: Path, options: GgufOptions = GgufOptions(),
                tokenizer_gguf: Path | None = None) -> GgufExport:
    """Write ``out_dir/model.gguf``; see the module docstring. The caller owns atomicity."""
    import gguf

    if options.dtype not in GGUF_DTYPES:
        raise CompressError(f"export.gguf.dtype: one of {', '.join(GGUF_DTYPES)} (got {options.dtype!r})")
    problem = gguf_problem(model)
    if problem:
        raise CompressError(f"formats: gguf: {problem}")
    tokens = _tokenizer_fields(tokenizer, tokenizer_gguf)
    vocab = int(model.get_input_embeddings().weight.shape[0])
    listed = len(tokens["tokenizer.ggml.tokens"][1])
    if listed != vocab:
        raise CompressError(f"formats: gguf: the tokenizer lists {listed} tokens but the embedding has {vocab} rows; "
                            "llama.cpp needs them equal")
    layers = _layers(model)
    uniform = len({(l.heads, l.kv_heads, l.ffn) for l in layers}) == 1 and not _has_biases(model)
    arch = "llama" if uniform else "deci"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / GGUF_FILE
    writer = gguf.GGUFWriter(str(path), arch)
    _write_metadata(writer, model, layers, arch, options)
    for key, (kind, value) in tokens.items():
        _add_field(writer, key, kind, value)
    counts: dict[str, int] = {}
    for name, array in _tensors(model, layers):
        data, kind = _encode(array, options.dtype)
        writer.add_tensor(name, data, raw_dtype=kind)
        counts[kind.name] = counts.get(kind.name, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return GgufExport(folder=out_dir, files=[GGUF_FILE], architecture=arch, tensor_types=counts,
                      bytes=path.stat().st_size)


# ----------------------------------------------------------------------------------- shape
def _layers(model: nn.Module) -> list[_Layer]:
    from compress.models.adapters import get_adapter

    adapter = get_adapter(model)
    return [_Layer(w.heads, w.kv_heads, w.intermediate, layer)
            for w, layer in zip(adapter.all_widths(), model.model.layers)]


def _has_biases(model: nn.Module) -> bool:
    return any(m.bias is not None for m in model.model.layers.modules() if isinstance(m, nn.Linear))


def _write_metadata(writer, model: nn.Module, layers: list[_Layer], arch: str, options: GgufOptions) -> None:
    import gguf

    config = model.config
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    rope = getattr(config, "rope_parameters", None) or {}
    theta = float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    writer.add_name(str(getattr(config, "_name_or_path", "") or "compressed model"))
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(len(layers))
    if arch == "llama":
        writer.add_feed_forward_length(layers[0].ffn)
        writer.add_head_count(layers[0].heads)
        writer.add_head_count_kv(layers[0].kv_heads)
    else:
        writer.add_feed_forward_length([l.ffn for l in layers])
        writer.add_head_count([l.heads for l in layers])
        writer.add_head_count_kv([l.kv_heads for l in layers])
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(model.get_input_embeddings().weight.shape[0]))
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[options.dtype]
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


# ----------------------------------------------------------------------------------- tensors
def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Rotary rows [heads * head_dim, E] from halves (Hugging Face) to interleaved pairs (llama.cpp)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _array(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to(device="cpu", dtype=torch.float32).numpy()


def _tensors(model: nn.Module, layers: list[_Layer]):
    """(llama.cpp name, float32 array) for every tensor, in file order."""
    embedding = model.get_input_embeddings().weight
    yield "token_embd.weight", _array(embedding)
    yield "output_norm.weight", _array(model.model.norm.weight)
    head = model.get_output_embeddings().weight
    if head.data_ptr() != embedding.data_ptr():
        yield "output.weight", _array(head)
    for i, layer in enumerate(layers):
        attention, mlp = layer.modules.self_attn, layer.modules.mlp
        yield f"blk.{i}.attn_norm.weight", _array(layer.modules.input_layernorm.weight)
        yield f"blk.{i}.attn_q.weight", _permute(_array(attention.q_proj.weight), layer.heads)
        yield f"blk.{i}.attn_k.weight", _permute(_array(attention.k_proj.weight), layer.kv_heads)
        yield f"blk.{i}.attn_v.weight", _array(attention.v_proj.weight)
        yield f"blk.{i}.attn_output.weight", _array(attention.o_proj.weight)
        for name, linear in (("attn_q", attention.q_proj), ("attn_k", attention.k_proj), ("attn_v", attention.v_proj)):
            if linear.bias is not None:
                raise CompressError(f"formats: gguf: layer {i} has a {name} bias, which llama.cpp's LLaMA "
                                    "architectures do not read")
        if attention.o_proj.bias is not None:
            yield f"blk.{i}.attn_output.bias", _array(attention.o_proj.bias)
        yield f"blk.{i}.ffn_norm.weight", _array(layer.modules.post_attention_layernorm.weight)
        yield f"blk.{i}.ffn_gate.weight", _array(mlp.gate_proj.weight)
        yield f"blk.{i}.ffn_up.weight", _array(mlp.up_proj.weight)
        yield f"blk.{i}.ffn_down.weight", _array(mlp.down_proj.weight)
        if mlp.down_proj.bias is not None:
            yield f"blk.{i}.ffn_down.bias", _array(mlp.down_proj.bias)


def _encode(array: np.ndarray, dtype: str):
    """(data, GGMLQuantizationType) for one tensor in the file's ``dtype``."""
    import gguf

    kind = gguf.GGMLQuantizationType
    if array.ndim < 2 or dtype == "f32":
        return array.astype(np.float32), kind.F32
    if dtype == "f16" or array.shape[-1] % _BLOCK:
        return array.astype(np.float16), kind.F16
    target = {"q8_0": kind.Q8_0, "q4_0": kind.Q4_0}[dtype]
    return gguf.quants.quantize(array.astype(np.float32), target), target


# ----------------------------------------------------------------------------------- tokenizer
def _tokenizer_fields(tokenizer, tokenizer_gguf: Path | None) -> dict:
    """{key: (kind, value)} of every ``tokenizer.*`` field: copied from a GGUF source, else from a
    BPE tokenizer.json; CompressError when neither is possible."""
    if tokenizer_gguf is not None:
        return _fields_of_gguf(tokenizer_gguf)
    if tokenizer is None:
        raise CompressError("formats: gguf: the model has no tokenizer to write into the GGUF")
    return _fields_of_tokenizer_json(tokenizer)


def _fields_of_gguf(path: Path) -> dict:
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            fields[key] = (field.types, field.contents())
    return fields


def _fields_of_tokenizer_json(tokenizer) -> dict:
    import gguf
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        tokenizer.save_pretrained(scratch)
        spec_path = Path(scratch) / "tokenizer.json"
        if not spec_path.is_file():
            raise CompressError("formats: gguf: the tokenizer has no tokenizer.json (a fast BPE tokenizer is needed)")
        spec = json.loads(spec_path.read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or not model.get("vocab"):
        raise CompressError(f"formats: gguf: writes BPE tokenizers; this one is {model.get('type')!r}")
    vocab = dict(model["vocab"])
    special = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    vocab.update(special)
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for token, index in vocab.items():
        tokens[index] = token
        types[index] = gguf.TokenType.CONTROL if token in special else gguf.TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    s, u32, arr = gguf.GGUFValueType.STRING, gguf.GGUFValueType.UINT32, gguf.GGUFValueType.ARRAY
    fields = {
        "tokenizer.ggml.model": ([s], "gpt2"),
        "tokenizer.ggml.pre": ([s], "default"),
        "tokenizer.ggml.tokens": ([arr, s], tokens),
        "tokenizer.ggml.token_type": ([arr, gguf.GGUFValueType.INT32], [int(t) for t in types]),
        "tokenizer.ggml.merges": ([arr, s], merges),
    }
    for key, value in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                       ("padding", tokenizer.pad_token_id), ("unknown", tokenizer.unk_token_id)):
        if value is not None:
            fields[f"tokenizer.ggml.{key}_token_id"] = ([u32], int(value))
    return fields


def _add_field(writer, key: str, kinds: list, value) -> None:
    import gguf

    kind = gguf.GGUFValueType
    if kinds[0] == kind.ARRAY:
        writer.add_array(key, list(value))
    elif kinds[0] == kind.STRING:
        writer.add_string(key, value)
    elif kinds[0] == kind.BOOL:
        writer.add_bool(key, bool(value))
    else:
        writer.add_key_value(key, value, kinds[0])
