"""Safetensors exporter for structurally pruned LLaMA-family decoders.

    export_safetensors(model, tokenizer, out_dir) -> {"files": [...], "uniform": bool, "config_class": str}

Widths are read from the modules (q_proj.out_features // head_dim, …), never from `model.config`,
which the surgeon may leave stale. Two outcomes:

* every layer has the same widths, and the stock config can express the biases present: a stock
  config of the model's own family (`LlamaConfig`, …) with the new head / KV-head / MLP counts and an
  explicit `head_dim`. Biases go through `attention_bias` / `mlp_bias`, which give *all* of q/k/v/o
  (resp. gate/up/down) a bias, so zero biases are written for the projections that had none.
* otherwise: `PrunedLlamaConfig` (per-layer lists and per-linear bias flags), the self-contained
  `pruned_llama.py` copied beside it and an `auto_map`, so the folder loads with
  `trust_remote_code=True` anywhere, and without it once `compress` is imported.

The caller owns atomicity (temp dir + rename); this module just writes into `out_dir`.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassClassValidationError
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, LlamaConfig, PreTrainedConfig, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from compress.errors import CompressError
from compress.models import pruned_llama
from compress.models.pruned_llama import ATTENTION_LINEARS, LINEAR_NAMES, MLP_LINEARS, PrunedLlamaConfig

__all__ = ["DecoderLayout", "LayerWidths", "export_safetensors", "read_layer_widths", "read_layout", "select_config",
           "zero_biases"]

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

STOCK_CAUSAL_LM = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "olmo2": "Olmo2ForCausalLM",
    "granite": "GraniteForCausalLM",
}

# How each stock family decides whether a linear has a bias: by a config flag (its name), or
# always (True) / never (False) whatever the config says.
STOCK_BIAS_RULES: dict[str, dict[str, str | bool]] = {
    "llama": {**dict.fromkeys(ATTENTION_LINEARS, "attention_bias"), **dict.fromkeys(MLP_LINEARS, "mlp_bias")},
    "mistral": dict.fromkeys(LINEAR_NAMES, False),
    "qwen2": {**dict.fromkeys(("q_proj", "k_proj", "v_proj"), True), **dict.fromkeys(("o_proj",) + MLP_LINEARS, False)},
    "qwen3": {**dict.fromkeys(ATTENTION_LINEARS, "attention_bias"), **dict.fromkeys(MLP_LINEARS, False)},
    "gemma": {**dict.fromkeys(ATTENTION_LINEARS, "attention_bias"), **dict.fromkeys(MLP_LINEARS, False)},
    "gemma2": {**dict.fromkeys(ATTENTION_LINEARS, "attention_bias"), **dict.fromkeys(MLP_LINEARS, False)},
    "gemma3_text": {**dict.fromkeys(ATTENTION_LINEARS, "attention_bias"), **dict.fromkeys(MLP_LINEARS, False)},
    "olmo2": {**dict.fromkeys(ATTENTION_LINEARS, "attention_bias"), **dict.fromkeys(MLP_LINEARS, False)},
    "granite": {**dict.fromkeys(ATTENTION_LINEARS, "attention_bias"), **dict.fromkeys(MLP_LINEARS, "mlp_bias")},
}

# config.to_dict() entries that describe the saved file rather than the architecture.
_BOOKKEEPING_KEYS = frozenset(
    {"model_type", "architectures", "auto_map", "transformers_version", "_name_or_path", "dtype"}
)
# Fields only PrunedLlamaConfig has (dropped when a pruned model is re-exported with a stock config).
_PRUNED_ONLY_FIELDS = frozenset(f.name for f in fields(PrunedLlamaConfig)) - {f.name for f in fields(LlamaConfig)}


@dataclass(frozen=True)
class LayerWidths:
    """Widths of one decoder layer, as its modules hold them."""

    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int


@dataclass(frozen=True)
class DecoderLayout:
    """What the exporter needs to know about the in-memory model, all read from its modules.

    layer_names: module path of each decoder layer ("model.layers.0", …).
    widths: one LayerWidths per layer.  biases: linear name -> True if any layer's linear has a bias.
    tied: lm_head.weight is the embedding tensor itself.
    """

    family: str
    head_dim: int
    layer_names: list[str]
    widths: list[LayerWidths]
    biases: dict[str, bool]
    tied: bool
    lm_head_name: str

    @property
    def uniform(self) -> bool:
        return len(set(self.widths)) == 1


# ---------------------------------------------------------------------------------------- reading


def base_family(config: PreTrainedConfig) -> str:
    """The stock family (a key of STOCK_CAUSAL_LM: "llama", "qwen2", "gemma3_text", ...) of a stock or
    pruned config."""
    model_type = config.model_type
    if model_type == PrunedLlamaConfig.model_type:
        model_type = config.base_model_type
    if model_type not in STOCK_CAUSAL_LM:
        raise ValueError(
            f"export_safetensors supports {sorted(STOCK_CAUSAL_LM)} decoders (and pruned_llama), "
            f"got model_type {config.model_type!r}."
        )
    return model_type


def _module_names(model: nn.Module) -> dict[int, str]:
    """id(module) -> its dotted path in `model`."""
    return {id(module): name for name, module in model.named_modules()}


def read_head_dim(layers: list[nn.Module]) -> int:
    """The head size D shared by all attention modules (their `head_dim` attribute; pruning keeps it)."""
    head_dims = {layer.self_attn.head_dim for layer in layers}
    if len(head_dims) != 1:
        raise ValueError(f"attention modules disagree on head_dim: {sorted(head_dims)}")
    return head_dims.pop()


def read_layer_widths(index: int, layer: nn.Module, head_dim: int) -> LayerWidths:
    """Heads H = q_proj rows / D, KV heads K = k_proj rows / D, MLP width F = gate_proj rows.

    Raises ValueError when the linears disagree with each other (q rows != o columns, …) or with
    `self_attn.num_key_value_groups`, which the forward pass uses and must equal H // K.
    """
    attention, mlp = layer.self_attn, layer.mlp
    q_rows, kv_rows = attention.q_proj.out_features, attention.k_proj.out_features
    if q_rows % head_dim or kv_rows % head_dim:
        raise ValueError(
            f"layer {index}: q_proj/k_proj rows ({q_rows}, {kv_rows}) are not multiples of head_dim {head_dim}"
        )
    if attention.o_proj.in_features != q_rows or attention.v_proj.out_features != kv_rows:
        raise ValueError(
            f"layer {index}: inconsistent attention shapes: q_proj rows {q_rows}, o_proj columns "
            f"{attention.o_proj.in_features}, k_proj rows {kv_rows}, v_proj rows {attention.v_proj.out_features}"
        )
    heads, kv_heads = q_rows // head_dim, kv_rows // head_dim
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"layer {index}: {heads} query heads do not split into groups over {kv_heads} KV heads")
    if attention.num_key_value_groups != heads // kv_heads:
        raise ValueError(
            f"layer {index}: self_attn.num_key_value_groups is {attention.num_key_value_groups} but the "
            f"weights hold {heads} query / {kv_heads} KV heads (expected {heads // kv_heads}); the surgery "
            "left the attribute stale"
        )
    channels = mlp.gate_proj.out_features
    if mlp.up_proj.out_features != channels or mlp.down_proj.in_features != channels:
        raise ValueError(
            f"layer {index}: inconsistent MLP shapes: gate_proj rows {channels}, up_proj rows "
            f"{mlp.up_proj.out_features}, down_proj columns {mlp.down_proj.in_features}"
        )
    return LayerWidths(heads, kv_heads, channels)


def _linear(layer: nn.Module, name: str) -> nn.Linear:
    """The q/k/v/o or gate/up/down linear `name` of a decoder layer."""
    parent = layer.self_attn if name in ATTENTION_LINEARS else layer.mlp
    return getattr(parent, name)


def read_bias_presence(layers: list[nn.Module]) -> dict[str, bool]:
    """Linear name -> True if that linear has a bias in at least one layer."""
    return {name: any(_linear(layer, name).bias is not None for layer in layers) for name in LINEAR_NAMES}


def read_layout(model: PreTrainedModel) -> DecoderLayout:
    """Everything the export needs, read from the modules of a *ForCausalLM."""
    layers = list(model.get_decoder().layers)
    names = _module_names(model)
    head_dim = read_head_dim(layers)
    output_embeddings = model.get_output_embeddings()
    return DecoderLayout(
        family=base_family(model.config),
        head_dim=head_dim,
        layer_names=[names[id(layer)] for layer in layers],
        widths=[read_layer_widths(index, layer, head_dim) for index, layer in enumerate(layers)],
        biases=read_bias_presence(layers),
        tied=output_embeddings.weight is model.get_input_embeddings().weight,
        lm_head_name=names[id(output_embeddings)],
    )


# ------------------------------------------------------------------------------------- configs


def _architecture_dict(config: PreTrainedConfig) -> dict:
    """`config` as keyword arguments for a new config, without the entries about the saved file."""
    return {key: value for key, value in config.to_dict().items() if key not in _BOOKKEEPING_KEYS}


def _stock_architecture_dict(config: PreTrainedConfig, family: str) -> dict:
    """Like `_architecture_dict`, for a stock `family` config: when `config` is a pruned config,
    its pruned-only fields are dropped except those the stock class also declares (e.g. Qwen's
    `layer_types`, Mistral's `sliding_window`)."""
    values = _architecture_dict(config)
    if config.model_type == PrunedLlamaConfig.model_type:
        stock_fields = {f.name for f in fields(CONFIG_MAPPING[family])}
        values = {key: value for key, value in values.items() if key not in _PRUNED_ONLY_FIELDS - stock_fields}
    return values


def stock_bias_flags(family: str, biases: dict[str, bool]) -> dict[str, bool] | None:
    """Config flags that give every present bias a slot in a stock `family` model, e.g.
    {"attention_bias": True, "mlp_bias": False}; None if some bias has no slot (e.g. Mistral)."""
    flags: dict[str, bool] = {}
    for name, present in biases.items():
        rule = STOCK_BIAS_RULES[family][name]
        if rule is False and present:
            return None
        if isinstance(rule, str):
            flags[rule] = flags.get(rule, False) or present
    return flags


def stock_bias_linears(family: str, flags: dict[str, bool]) -> set[str]:
    """Linears that carry a bias in a stock `family` model built with `flags`."""
    rules = STOCK_BIAS_RULES[family]
    return {name for name, rule in rules.items() if rule is True or (isinstance(rule, str) and flags[rule])}


def stock_config(model: PreTrainedModel, layout: DecoderLayout) -> tuple[PreTrainedConfig | None, str | None]:
    """(config, None) for a stock config of the model's family with the pruned widths, or
    (None, reason) when widths differ per layer or the stock config cannot express the result."""
    if not layout.uniform:
        return None, "widths differ between layers"
    flags = stock_bias_flags(layout.family, layout.biases)
    if flags is None:
        present = sorted(name for name, has_bias in layout.biases.items() if has_bias)
        return None, f"a stock {layout.family} config cannot hold biases on {present}"
    widths = layout.widths[0]
    values = _stock_architecture_dict(model.config, layout.family)
    values.update(
        num_attention_heads=widths.num_attention_heads,
        num_key_value_heads=widths.num_key_value_heads,
        intermediate_size=widths.intermediate_size,
        head_dim=layout.head_dim,
        tie_word_embeddings=layout.tied,
        **flags,
    )
    try:
        config = AutoConfig.for_model(layout.family, **values)
    except StrictDataclassClassValidationError as error:  # e.g. LLaMA: hidden_size % heads != 0
        return None, f"the stock {layout.family} config rejects these widths: {error}"
    config.architectures = [STOCK_CAUSAL_LM[layout.family]]
    return config, None


def pruned_config(model: PreTrainedModel, layout: DecoderLayout) -> PrunedLlamaConfig:
    """A PrunedLlamaConfig with the per-layer widths and per-linear bias flags of `layout`.

    The scalar head / KV-head / MLP counts are the per-layer maxima (they size the scaffold only).
    """
    heads = [widths.num_attention_heads for widths in layout.widths]
    kv_heads = [widths.num_key_value_heads for widths in layout.widths]
    channels = [widths.intermediate_size for widths in layout.widths]
    values = _architecture_dict(model.config)
    values.update(
        base_model_type=layout.family,
        num_attention_heads=max(heads),
        num_key_value_heads=max(kv_heads),
        intermediate_size=max(channels),
        head_dim=layout.head_dim,
        num_attention_heads_per_layer=heads,
        num_key_value_heads_per_layer=kv_heads,
        intermediate_size_per_layer=channels,
        tie_word_embeddings=layout.tied,
        **{f"{name}_bias": present for name, present in layout.biases.items()},
    )
    config = PrunedLlamaConfig(**values)
    config.architectures = [pruned_llama.PrunedLlamaForCausalLM.__name__]
    config.auto_map = remote_code_auto_map()
    return config


def select_config(model: PreTrainedModel, layout: DecoderLayout) -> tuple[PreTrainedConfig, set[str], str | None]:
    """(config to write, linears that must carry a bias in the saved weights, why a uniform model
    still needs the pruned config or None): the stock config when it can express the result,
    otherwise `pruned_config`. Reads only the config and module shapes (meta models work)."""
    config, reason = stock_config(model, layout)
    if config is not None:
        bias_linears = stock_bias_linears(layout.family, stock_bias_flags(layout.family, layout.biases))
    else:
        config = pruned_config(model, layout)
        bias_linears = {name for name, present in layout.biases.items() if present}
    config.dtype = model_dtype(model)
    return config, bias_linears, reason


def needs_remote_code(config: PreTrainedConfig) -> bool:
    """True for a pruned config, which ships pruned_llama.py beside it."""
    return isinstance(config, PrunedLlamaConfig)


def remote_code_auto_map() -> dict[str, str]:
    """`auto_map` pointing the Auto classes at the copied pruned_llama.py."""
    module = Path(pruned_llama.__file__).stem
    return {
        "AutoConfig": f"{module}.{pruned_llama.PrunedLlamaConfig.__name__}",
        "AutoModelForCausalLM": f"{module}.{pruned_llama.PrunedLlamaForCausalLM.__name__}",
    }


# ------------------------------------------------------------------------------------- weights


def export_state_dict(model: PreTrainedModel, layout: DecoderLayout, bias_linears: set[str]) -> dict[str, torch.Tensor]:
    """The tensors to save: the model's state dict on CPU, contiguous, without lm_head.weight when
    tied, plus a zero bias [out_features] for every linear in `bias_linears` that has none."""
    state = {name: tensor.detach().to("cpu").contiguous() for name, tensor in model.state_dict().items()}
    if layout.tied:
        state.pop(f"{layout.lm_head_name}.weight", None)
    state.update(zero_biases(model, layout, bias_linears, present=state))
    return _without_shared_storage(state)


def zero_biases(model: PreTrainedModel, layout: DecoderLayout, bias_linears: set[str], present) -> dict[str, torch.Tensor]:
    """A zero bias [out_features] for every linear named in `bias_linears` whose bias key is not in
    `present` (the stock config gives e.g. all of q/k/v/o a bias when o_proj has one). Reads only
    module shapes, so `model` may be on the meta device."""
    zeros = {}
    for layer_name, layer in zip(layout.layer_names, model.get_decoder().layers):
        for name in sorted(bias_linears):
            linear = _linear(layer, name)
            parent = "self_attn" if name in ATTENTION_LINEARS else "mlp"
            key = f"{layer_name}.{parent}.{name}.bias"
            if key not in present and linear.bias is None:
                zeros[key] = torch.zeros(linear.out_features, dtype=linear.weight.dtype)
    return zeros


def _without_shared_storage(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Clone tensors whose storage another entry already uses (safetensors refuses shared memory)."""
    seen: set[int] = set()
    result = {}
    for name, tensor in state.items():
        pointer = tensor.untyped_storage().data_ptr()
        result[name] = tensor.clone() if pointer in seen and tensor.numel() else tensor
        seen.add(pointer)
    return result


def model_dtype(model: nn.Module) -> torch.dtype:
    """dtype of the floating-point parameters (what config.json's `dtype` records)."""
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


# --------------------------------------------------------------------------------------- writing


def write_weights(state: dict[str, torch.Tensor], out_dir: Path) -> list[str]:
    """model.safetensors with transformers' metadata; returns the file name."""
    save_file(state, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    return [WEIGHTS_FILE]


def write_config(config: PreTrainedConfig, out_dir: Path) -> list[str]:
    """config.json (transformers' diff format, as save_pretrained writes it)."""
    config.to_json_file(out_dir / CONFIG_FILE)
    return [CONFIG_FILE]


def write_remote_code(out_dir: Path, module=pruned_llama) -> list[str]:
    """Copy a self-contained modeling file (pruned_llama.py, or pruned_moe.py for MoE models)
    beside the config for trust_remote_code loading."""
    source = Path(module.__file__)
    shutil.copyfile(source, out_dir / source.name)
    return [source.name]


def write_tokenizer(tokenizer, out_dir: Path) -> list[str]:
    """The tokenizer's own files (none when `tokenizer` is None)."""
    if tokenizer is None:
        return []
    saved = tokenizer.save_pretrained(str(out_dir))
    return [str(Path(path).relative_to(out_dir)) for path in saved if Path(path).is_file()]


def write_generation_config(model: PreTrainedModel, out_dir: Path) -> list[str]:
    """generation_config.json when the model carries one."""
    generation_config = getattr(model, "generation_config", None)
    if generation_config is None:
        return []
    generation_config.save_pretrained(str(out_dir))
    return ["generation_config.json"]


def export_safetensors(model: PreTrainedModel, tokenizer, out_dir: Path) -> dict:
    """Write `model` (a possibly pruned LLaMA/Mistral/Qwen2/Qwen3 *ForCausalLM, or a
    PrunedLlamaForCausalLM) with its tokenizer into `out_dir` so that
    `AutoModelForCausalLM.from_pretrained(out_dir)` rebuilds it exactly.

    Returns {"files": names relative to out_dir (sorted), "uniform": all layers share widths,
    "config_class": name of the config class written, "stock_config_reason": why a uniform model
    still needed PrunedLlamaConfig (None otherwise)}.
    """
    from compress.models.moe import is_moe_model

    if is_moe_model(model):
        raise CompressError(f"{type(model).__name__} is a mixture-of-experts model: export it with "
                            "exporters.moe.export_moe_safetensors")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    layout = read_layout(model)
    config, bias_linears, reason = select_config(model, layout)
    files: list[str] = []
    if needs_remote_code(config):
        files += write_remote_code(out_dir)
    files += write_weights(export_state_dict(model, layout, bias_linears), out_dir)
    files += write_config(config, out_dir)
    files += write_generation_config(model, out_dir)
    files += write_tokenizer(tokenizer, out_dir)
    return {
        "files": sorted(set(files)),
        "uniform": layout.uniform,
        "config_class": type(config).__name__,
        "stock_config_reason": reason if layout.uniform else None,
    }
