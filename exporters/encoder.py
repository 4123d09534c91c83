"""Exporters for (head-)pruned transformer encoders: BERT family, ViT, DeiT, DINOv2, CLIP towers.

    encoder_config(model) -> PreTrainedConfig
    export_encoder_safetensors(model, preprocessor, out_dir) -> {"files": [...], "config_class": str}
    export_encoder_onnx(model, out_dir, opset=18) -> {"files", "inputs", "outputs", "bytes", "nodes"}
    encoder_onnx_parity(model, onnx_path, inputs) -> {"max_abs_diff", "mean_abs_diff", "provider"}
    sample_encoder_inputs(model, batch=2, seq=16, seed=0) -> {name: tensor}

Widths are read from the modules (through `EncoderAdapter`), never from `model.config`. A model
whose layers all keep the dense widths is written with its stock config (`BertConfig`, …, without
the per-layer attributes the surgeon records); any other gets the matching `Pruned*Config` from
`compress.models.pruned_encoder`, with that self-contained file copied beside it and an `auto_map`,
so `AutoModel.from_pretrained(folder, trust_remote_code=True)` works without `compress`.

Only base encoders are exported (`BertModel`, `ViTModel`, `DeiTModel`, `Dinov2Model`,
`CLIPTextModel`, `CLIPVisionModel` and their pruned classes); task-head models are refused.
The caller owns atomicity (temp dir + rename); these functions just write into `out_dir`.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from compress.errors import CompressError
from compress.models import pruned_encoder, token_pruning
from compress.models.encoder import EncoderAdapter
from compress.models.pruned_encoder import _PER_LAYER_FIELDS, _TOKEN_FIELDS, PRUNED_CLASSES, PRUNED_MODEL_TYPES, dense_intermediate
from exporters.onnx import _slim
from exporters.safetensors import (
    _architecture_dict,
    _without_shared_storage,
    model_dtype,
    write_config,
    write_remote_code,
    write_tokenizer,
    write_weights,
)

__all__ = [
    "encoder_config",
    "encoder_onnx_parity",
    "encoder_onnx_io",
    "export_encoder_onnx",
    "export_encoder_safetensors",
    "sample_encoder_inputs",
]

ONNX_FILE = "model.onnx"
ONNX_DATA_FILE = "model.onnx.data"
DEFAULT_OPSET = 18
OUTPUT_NAME = "last_hidden_state"
# Extra outputs of a token-pruned encoder: [batch, tokens] float sizes (0 = padding) and int64 original indices.
TOKEN_OUTPUTS = ("token_sizes", "kept_positions")
_PROTOBUF_LIMIT = 2**31 - 2**20  # a single-file graph must stay below 2 GiB (with some room for the graph)

# The attributes `record_widths` writes on a stock config, and the fields only a Pruned*Config has.
PER_LAYER_ATTRIBUTES = tuple(_PER_LAYER_FIELDS) + tuple(_TOKEN_FIELDS)
# stock model_type -> stock base model class (BertModel, …): the parent of each pruned model class.
BASE_MODEL_CLASSES = {family: model_class.__bases__[0] for family, (_, model_class) in PRUNED_CLASSES.items()}


# ------------------------------------------------------------------------------------- checks
def _adapter(model: nn.Module) -> EncoderAdapter:
    """The model's adapter; a CompressError unless ``model`` is a supported base encoder."""
    adapter = EncoderAdapter(model)
    base_class = BASE_MODEL_CLASSES[adapter.family]
    if not isinstance(model, base_class):
        raise CompressError(
            f"only base encoders can be exported ({base_class.__name__} or its pruned version), got "
            f"{type(model).__name__}: export its base model instead (model.{model.base_model_prefix}, or "
            f"AutoModel.from_pretrained of the same folder) and keep the task head separately"
        )
    return adapter


def _is_dense(adapter: EncoderAdapter) -> bool:
    """Every layer has the stock config's head count, head size and FFN width."""
    config = adapter.config
    heads = int(config.num_attention_heads)
    dense_head_dim = adapter.hidden_size // heads
    if adapter.head_dim != dense_head_dim or heads * dense_head_dim != adapter.hidden_size:
        return False
    dense_ffn = dense_intermediate(config)
    return all(w.heads == heads and w.intermediate == dense_ffn for w in adapter.all_widths())


# ------------------------------------------------------------------------------------- configs
def _stock_values(config: PreTrainedConfig) -> dict:
    """``config`` as keyword arguments for a new config: no file bookkeeping, no per-layer fields."""
    return {key: value for key, value in _architecture_dict(config).items() if key not in PER_LAYER_ATTRIBUTES}


def remote_code_auto_map(family: str) -> dict[str, str]:
    """`auto_map` pointing AutoConfig / AutoModel at the copied pruned_encoder.py."""
    config_class, model_class = PRUNED_CLASSES[family]
    module = Path(pruned_encoder.__file__).stem
    return {"AutoConfig": f"{module}.{config_class.__name__}", "AutoModel": f"{module}.{model_class.__name__}"}


def encoder_config(model: nn.Module) -> PreTrainedConfig:
    """The config to write for ``model`` (a stock or pruned base encoder); ``model.config`` is not changed.

    All layers dense: the stock config (a copy of the model's own without the per-layer attributes,
    or rebuilt from a pruned config's fields). Otherwise a ``Pruned*Config`` of the family with the
    dense scalars of the stock config and the per-layer widths read from the modules.
    """
    adapter = _adapter(model)
    family, config = adapter.family, model.config
    rewrite = getattr(config, "token_pruning", None)
    if _is_dense(adapter) and rewrite is None:
        if type(config) is CONFIG_MAPPING[family]:
            result = copy.deepcopy(config)
            for name in PER_LAYER_ATTRIBUTES:
                if name in result.__dict__:
                    delattr(result, name)
        else:  # a pruned class whose layers are all dense
            values = _stock_values(config)
            result = AutoConfig.for_model(family, **values)
        result.architectures = [BASE_MODEL_CLASSES[family].__name__]
        return result

    widths = adapter.all_widths()
    values = _stock_values(config)
    values.update(
        base_model_type=family,
        attention_head_dim=adapter.head_dim,
        num_attention_heads_per_layer=[w.heads for w in widths],
        intermediate_size_per_layer=[w.intermediate for w in widths],
        token_pruning=copy.deepcopy(rewrite),
    )
    config_class, model_class = PRUNED_CLASSES[family]
    result = config_class(**values)
    result.architectures = [model_class.__name__]
    result.auto_map = remote_code_auto_map(family)
    return result


def _uses_pruned_config(config: PreTrainedConfig) -> bool:
    return config.model_type in PRUNED_MODEL_TYPES


# ------------------------------------------------------------------------------------- safetensors
def export_encoder_safetensors(model: nn.Module, preprocessor, out_dir: Path) -> dict:
    """Write ``model`` (a stock or pruned base encoder) into ``out_dir``: model.safetensors,
    config.json, pruned_encoder.py when a pruned config is needed, and the tokenizer or image
    processor ``preprocessor`` (anything with ``save_pretrained``; None for none), so that
    ``AutoModel.from_pretrained(out_dir)`` rebuilds it exactly.

    Returns {"files": names relative to out_dir (sorted), "config_class": name of the config class}.
    """
    out_dir = Path(out_dir)
    config = encoder_config(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    files: list[str] = []
    if _uses_pruned_config(config):
        files += write_remote_code(out_dir, pruned_encoder) + write_remote_code(out_dir, token_pruning)
    config.dtype = model_dtype(model)
    state = {name: tensor.detach().to("cpu").contiguous() for name, tensor in model.state_dict().items()}
    files += write_weights(_without_shared_storage(state), out_dir)
    files += write_config(config, out_dir)
    files += write_tokenizer(preprocessor, out_dir)
    return {"files": sorted(set(files)), "config_class": type(config).__name__}


SENTENCE_TRANSFORMERS_FILES = ("modules.json", "config_sentence_transformers.json", "sentence_bert_config.json")


def copy_sentence_transformers_modules(source: Path, out_dir: Path) -> list[str]:
    """When ``source`` is a sentence-transformers folder (it has ``modules.json``), make ``out_dir`` one
    too: copy modules.json, its config files and every module folder besides the transformer itself
    (Pooling, Normalize, Dense …, whose widths pruning heads or channels does not change), so that
    ``SentenceTransformer(out_dir, trust_remote_code=True)`` pools and normalises as the source did.
    Returns the copied files, relative to ``out_dir`` (none for another folder)."""
    source, out_dir = Path(source), Path(out_dir)
    if not (source / "modules.json").is_file():
        return []
    copied = []
    for name in SENTENCE_TRANSFORMERS_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, out_dir / name)
            copied.append(name)
    for module in json.loads((source / "modules.json").read_text(encoding="utf-8")):
        folder = source / module.get("path", "")
        if module.get("path") and folder.is_dir():
            shutil.copytree(folder, out_dir / module["path"], dirs_exist_ok=True)
            copied += [str(p.relative_to(out_dir)) for p in sorted((out_dir / module["path"]).rglob("*")) if p.is_file()]
    return copied


# ------------------------------------------------------------------------------------------- ONNX
def encoder_onnx_io(model: nn.Module) -> tuple[list[str], list[str]]:
    """(input names, output names) of the graph `export_encoder_onnx` writes for ``model``."""
    adapter = EncoderAdapter(model)
    outputs = [OUTPUT_NAME] + (list(TOKEN_OUTPUTS) if _has_token_pruning(model) else [])
    if adapter.modality == "image":
        return ["pixel_values"], outputs
    names = ["input_ids", "attention_mask"]
    if adapter.family == "bert":
        names.append("token_type_ids")
    return names, outputs


def _has_token_pruning(model: nn.Module) -> bool:
    return getattr(model.config, "token_pruning", None) is not None


class _Encoder(nn.Module):
    """Base encoder -> last_hidden_state (and, with token pruning, token_sizes and kept_positions),
    with the graph's inputs as named positional arguments."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.token_outputs = _has_token_pruning(model)

    def outputs(self, result):
        if self.token_outputs:
            return result.last_hidden_state, result.token_sizes, result.kept_positions
        return result.last_hidden_state


class _VisionEncoder(_Encoder):
    def forward(self, pixel_values):
        return self.outputs(self.model(pixel_values=pixel_values))


class _TextEncoder(_Encoder):
    def forward(self, input_ids, attention_mask):
        return self.outputs(self.model(input_ids=input_ids, attention_mask=attention_mask))


class _BertEncoder(_Encoder):
    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.outputs(self.model(input_ids=input_ids, attention_mask=attention_mask,
                                       token_type_ids=token_type_ids))


def _wrapper(model: nn.Module, input_names: list[str]) -> _Encoder:
    if input_names == ["pixel_values"]:
        return _VisionEncoder(model)
    return (_BertEncoder if "token_type_ids" in input_names else _TextEncoder)(model)


def _dynamic_shapes(input_names: list[str], model: nn.Module) -> dict:
    batch = torch.export.Dim("batch")
    if input_names == ["pixel_values"]:
        return {"pixel_values": {0: batch}}
    max_positions = getattr(model.config, "max_position_embeddings", None)
    # Token counts of a token-pruned text encoder are integer expressions of seq; torch.export cannot
    # solve the rational lower bounds they imply for tiny seq, and they hold for any seq >= 8.
    low = 8 if _has_token_pruning(model) else 0
    seq = torch.export.Dim("seq", min=low, max=max_positions) if max_positions else torch.export.Dim("seq", min=low)
    return {name: {0: batch, 1: seq} for name in input_names}


def export_encoder_onnx(model: nn.Module, out_dir: Path, opset: int = DEFAULT_OPSET, image_size: int | None = None) -> dict:
    """Trace ``model`` (a CPU float32 copy in eval mode; the model is not changed) with the dynamo
    exporter into ``out_dir``/model.onnx, simplified with onnxslim.

    Text encoders take int64 ``input_ids``, ``attention_mask`` (1 = token, 0 = padding) and, for BERT,
    ``token_type_ids``, all [batch, seq] with dynamic batch and seq (seq up to
    max_position_embeddings); vision encoders take float32 ``pixel_values`` [batch, channels, H, W]
    with dynamic batch and the config's image size (or ``image_size`` when given: DINOv2 is trained at
    518² but usually fed 224², its position embeddings interpolated to the input). The output is ``last_hidden_state`` [batch, tokens, hidden].
    Weights go to model.onnx.data only when the graph would exceed the 2 GiB protobuf limit.

    Returns {"files", "inputs", "outputs", "bytes" (graph + weights), "nodes"}.
    """
    _adapter(model)
    input_names, output_names = encoder_onnx_io(model)
    traced = copy.deepcopy(model).to(device="cpu", dtype=torch.float32).eval()
    traced.config._attn_implementation = "sdpa"
    sample = sample_encoder_inputs(traced, batch=2, seq=8, image_size=image_size)
    return trace_to_onnx(_wrapper(traced, input_names).eval(), tuple(sample[name] for name in input_names),
                         input_names, output_names, _dynamic_shapes(input_names, traced), Path(out_dir), opset)


def trace_to_onnx(wrapper: nn.Module, sample: tuple, input_names: list[str], output_names: list[str],
                  dynamic_shapes: dict, out_dir: Path, opset: int = DEFAULT_OPSET) -> dict:
    """Trace ``wrapper`` (CPU float32, eval mode) on ``sample`` with the dynamo exporter, simplify
    the graph with onnxslim, check its opset and I/O names, and write ``out_dir``/model.onnx
    (weights in model.onnx.data only past the 2 GiB protobuf limit).

    Returns {"files", "inputs", "outputs", "bytes" (graph + weights), "nodes"}."""
    import onnx

    out_dir.mkdir(parents=True, exist_ok=True)
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".trace-") as scratch:
        raw = Path(scratch) / ONNX_FILE
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                wrapper,
                sample,
                dynamo=True,
                opset_version=opset,
                dynamic_shapes=dynamic_shapes,
                input_names=input_names,
                output_names=output_names,
                optimize=True,
                verbose=False,
            )
            program.save(raw, external_data=True)
        del program
        proto = _slim(onnx.load(str(raw), load_external_data=True))
    _check_graph(proto, opset, input_names, output_names)
    for stale in (out_dir / ONNX_FILE, out_dir / ONNX_DATA_FILE):
        stale.unlink(missing_ok=True)
    external = proto.ByteSize() > _PROTOBUF_LIMIT
    if external:
        onnx.save_model(proto, str(out_dir / ONNX_FILE), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=ONNX_DATA_FILE, size_threshold=1024)
        (out_dir / ONNX_DATA_FILE).chmod((out_dir / ONNX_FILE).stat().st_mode & 0o777)
        files = [ONNX_FILE, ONNX_DATA_FILE]
    else:
        onnx.save_model(proto, str(out_dir / ONNX_FILE))
        files = [ONNX_FILE]
    return {
        "files": files,
        "inputs": input_names,
        "outputs": output_names,
        "bytes": sum((out_dir / name).stat().st_size for name in files),
        "nodes": len(proto.graph.node),
    }


def _check_graph(proto, opset: int, input_names: list[str], output_names: list[str]) -> None:
    """The graph has the promised default-domain opset and I/O names (torch may change both)."""
    opsets = {entry.domain: entry.version for entry in proto.opset_import}
    if opsets.get("", opsets.get("ai.onnx")) != opset:
        raise RuntimeError(f"exported graph has opset {opsets}, expected {opset} for the default domain")
    inputs = [i.name for i in proto.graph.input]
    outputs = [o.name for o in proto.graph.output]
    if inputs != input_names or outputs != output_names:
        raise RuntimeError(f"exported graph I/O {inputs} -> {outputs}, expected {input_names} -> {output_names}")


def parity_session(onnx_path: Path, device: str | None = None):
    """An ONNX Runtime session for parity checks: basic graph optimisations, quiet, on ``device``
    (None = cuda when torch sees a GPU, else cpu)."""
    from compress.onnx_runtime import import_onnxruntime, select_providers

    ort = import_onnxruntime()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.log_severity_level = 3
    return ort.InferenceSession(str(onnx_path), options, providers=select_providers(device))


def encoder_onnx_parity(model: nn.Module, onnx_path: Path, inputs: dict[str, torch.Tensor],
                        device: str | None = None) -> dict:
    """last_hidden_state of ``model`` (PyTorch, on its own device) against the graph at ``onnx_path``
    run by ONNX Runtime on the same ``inputs`` (from `sample_encoder_inputs` or a preprocessor; every
    position is compared, padded ones included).

    ``device``: ORT device (cpu, cuda, cuda:N); None = cuda when torch sees a GPU, else cpu. CUDA
    runs with TF32 off and falls back to the CPU when this ONNX Runtime has no CUDA provider.
    A token-pruned encoder is compared first on its kept index sets (`kept_index_agreement`), then on
    the values of the inputs whose sets agree.

    Returns {"max_abs_diff", "mean_abs_diff", "provider"} (+ the `kept_index_agreement` keys).
    """
    import numpy as np

    session = parity_session(onnx_path, device)
    names = [i.name for i in session.get_inputs()]
    missing = [name for name in names if name not in inputs]
    if missing:
        raise CompressError(f"{onnx_path} needs inputs {missing}; got {sorted(inputs)}")
    feeds = {name: inputs[name].detach().cpu().numpy() for name in names}
    token_outputs = _has_token_pruning(model)
    onnx_outputs = session.run([OUTPUT_NAME, *TOKEN_OUTPUTS] if token_outputs else [OUTPUT_NAME], feeds)
    model_device = next(model.parameters()).device
    with torch.no_grad():
        result = model(**{name: inputs[name].to(model_device) for name in names})
    expected = result.last_hidden_state.float().cpu().numpy()
    onnx_out = onnx_outputs[0].astype(np.float32)
    if onnx_out.shape != expected.shape:
        raise RuntimeError(f"ONNX output shape {onnx_out.shape} != PyTorch {expected.shape}")
    report = {"provider": session.get_providers()[0]}
    if token_outputs:
        torch_sizes, torch_positions = result.token_sizes.cpu().numpy(), result.kept_positions.cpu().numpy()
        agreement = kept_index_agreement(torch_sizes, torch_positions, onnx_outputs[1], onnx_outputs[2])
        report.update(agreement)
        rows = agreement["agreeing_rows"]
        onnx_out = real_tokens_by_position(onnx_out, onnx_outputs[1], onnx_outputs[2], rows)
        expected = real_tokens_by_position(expected, torch_sizes, torch_positions, rows)
    diff = np.abs(onnx_out - expected)
    report.update(max_abs_diff=float(diff.max()) if diff.size else 0.0,
                  mean_abs_diff=float(diff.mean()) if diff.size else 0.0)
    return report


def real_tokens_by_position(hidden, sizes, positions, rows: list[int]):
    """The real tokens (size > 0) of ``rows`` in the order of their original positions, [tokens, E].

    ``hidden`` [batch, T, E], ``sizes`` and ``positions`` [batch, T] numpy arrays. Which padding
    slot fills an unused budget is a tie (PyTorch and ONNX Runtime may break it differently), and
    after a ToMe merge the slots that padding took move the real tokens, so values are compared by
    original position, not by slot."""
    import numpy as np

    picked = []
    for row in rows:
        real = sizes[row] > 0
        picked.append(hidden[row][real][np.argsort(positions[row][real], kind="stable")])
    return np.concatenate(picked) if picked else hidden[:0, 0]


def kept_index_agreement(torch_sizes, torch_positions, onnx_sizes, onnx_positions) -> dict:
    """Compare, per input, the set of original token indices a token-pruned encoder kept (tokens with
    size > 0) in PyTorch and in ONNX Runtime. All arguments are [batch, tokens] numpy arrays.

    Returns {"kept_index_rows": inputs compared, "kept_index_mismatches": inputs whose sets differ,
    "agreeing_rows": indices of the inputs whose sets agree (their values are then comparable)}."""
    agreeing = []
    for row in range(torch_sizes.shape[0]):
        kept_torch = set(torch_positions[row][torch_sizes[row] > 0].tolist())
        kept_onnx = set(onnx_positions[row][onnx_sizes[row] > 0].tolist())
        if kept_torch == kept_onnx:
            agreeing.append(row)
    return {"kept_index_rows": int(torch_sizes.shape[0]),
            "kept_index_mismatches": int(torch_sizes.shape[0] - len(agreeing)), "agreeing_rows": agreeing}


# ------------------------------------------------------------------------------------------ inputs
def sample_encoder_inputs(model: nn.Module, batch: int = 2, seq: int = 16, seed: int = 0,
                          image_size: int | None = None) -> dict[str, torch.Tensor]:
    """Random inputs for ``model``, on its device.

    Text: ``input_ids`` [batch, seq] uniform over the vocabulary (the pad id, else 0, where padded),
    ``attention_mask`` with right padding (row 0 full, the last row about half padding, those
    between in steps) and, for BERT,
    ``token_type_ids`` (zeros). Images: ``pixel_values`` [batch, channels, H, W], standard normal, at
    the config's image size or ``image_size``.
    """
    adapter = EncoderAdapter(model)
    config = model.config
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    if adapter.modality == "image":
        size = image_size or config.image_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        channels = getattr(config, "num_channels", 3)
        return {"pixel_values": torch.randn(batch, channels, height, width, generator=generator).to(device)}
    input_ids = torch.randint(0, config.vocab_size, (batch, seq), generator=generator)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    for row in range(1, batch):
        length = max(1, seq - (row * (seq // 2)) // max(1, batch - 1))
        attention_mask[row, length:] = 0
    pad = getattr(config, "pad_token_id", None)
    pad = pad if isinstance(pad, int) and 0 <= pad < config.vocab_size else 0
    input_ids = input_ids.masked_fill(attention_mask == 0, pad)
    result = {"input_ids": input_ids, "attention_mask": attention_mask}
    if adapter.family == "bert":
        result["token_type_ids"] = torch.zeros(batch, seq, dtype=torch.long)
    return {name: tensor.to(device) for name, tensor in result.items()}
