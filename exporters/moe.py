"""Safetensors export of mixture-of-experts causal LMs (Mixtral, Qwen2-MoE, Qwen3-MoE).

A stock config when every sparse layer keeps the same number of experts, else a ``pruned_moe``
config with per-layer counts and its remote code; the weights in the family's per-expert layout.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn
from transformers.core_model_loading import revert_weight_conversion

from compress.models import pruned_moe
from compress.models.moe import MOE_FAMILIES, TOP_K_KEY, MoeAdapter
from compress.models.pruned_moe import pruned_moe_classes
from exporters.safetensors import (
    _architecture_dict,
    _without_shared_storage,
    model_dtype,
    write_config,
    write_generation_config,
    write_remote_code,
    write_tokenizer,
    write_weights,
)


def export_moe_safetensors(model: nn.Module, tokenizer, out_dir: Path) -> dict:
    """Write an MoE causal LM so that ``AutoModelForCausalLM.from_pretrained(out_dir)`` rebuilds it.

    * A stock model (Mixtral / Qwen2-MoE / Qwen3-MoE class) whose sparse layers all hold the same
      expert count: the stock config with the kept count and top-k, written by ``save_pretrained`` in
      the family's checkpoint layout (per-expert tensors, as on the hub, which serving engines read).
    * Different counts per layer (``allocator: global``), or a model that already is a pruned_moe
      model: a pruned_moe config (``base_model_type``, ``num_experts_per_layer``), the weights in
      the family's per-expert layout too (layer i holds experts 0..E_i-1 and ``gate.weight
      [E_i, h]``), and the self-contained ``pruned_moe.py`` copied beside them with an
      ``auto_map``, so the folder loads with ``trust_remote_code=True`` anywhere and without it
      once ``compress`` is imported.

    Every sparse layer must route the same top-k (a config holds one). Returns {"files": names
    written, "uniform": all sparse layers hold the same count, "config_class": the config class
    written, "stock_config_reason": why a uniform model got a pruned_moe config (else None)}.
    """
    adapter = MoeAdapter(model)
    adapter.top_k()  # fails closed on per-layer top-k
    uniform = len(set(adapter.expert_counts().values())) == 1
    stock = adapter.config.model_type in MOE_FAMILIES
    if not (uniform and stock):
        reason = None if not uniform else f"{type(model).__name__} is a per-layer-count (pruned_moe) model"
        return export_per_layer_counts(model, adapter, tokenizer, Path(out_dir)) | {"stock_config_reason": reason}
    adapter.sync_config()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    before = {p.name for p in out_dir.iterdir()}
    model.save_pretrained(str(out_dir))
    files = {p.name for p in out_dir.iterdir() if p.is_file()} - before
    files |= set(write_tokenizer(tokenizer, out_dir))
    return {"files": sorted(files), "uniform": True, "config_class": type(model.config).__name__,
            "stock_config_reason": None}


def pruned_moe_config(model: nn.Module, adapter: MoeAdapter):
    """The pruned_moe config of ``model``: its own config's fields, the per-layer expert counts read
    from the modules (0 for dense layers), the scalar count set to their maximum (the scaffold the
    loader slices), the shared top-k, ``architectures`` and an ``auto_map`` to the copied file."""

    config_class, model_class = pruned_moe_classes(adapter.model_type)
    counts = adapter.num_experts_per_layer()
    values = _architecture_dict(model.config)
    for key in ("num_local_experts", "num_experts", "base_model_type", "num_experts_per_layer"):
        values.pop(key, None)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    values.update({adapter.family.expert_count_key: max(counts), TOP_K_KEY: adapter.top_k(),
                   "base_model_type": adapter.model_type, "num_experts_per_layer": counts,
                   "tie_word_embeddings": tied})
    config = config_class(**values)
    module = Path(pruned_moe.__file__).stem
    config.architectures = [model_class.__name__]
    config.auto_map = {"AutoConfig": f"{module}.{config_class.__name__}",
                       "AutoModelForCausalLM": f"{module}.{model_class.__name__}"}
    config.dtype = model_dtype(model)
    return config


def export_per_layer_counts(model: nn.Module, adapter: MoeAdapter, tokenizer, out_dir: Path) -> dict:
    """config.json (pruned_moe), model.safetensors (the state dict in the family's per-expert
    checkpoint layout, without ``lm_head.weight`` when tied), pruned_moe.py,
    generation_config.json and the tokenizer."""
    config = pruned_moe_config(model, adapter)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().to("cpu") for name, tensor in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    # The base family's hub layout (per-expert tensors), as save_pretrained writes it.
    state = {name: tensor.contiguous() for name, tensor in revert_weight_conversion(model, state).items()}
    files = write_remote_code(out_dir, pruned_moe)
    files += write_weights(_without_shared_storage(state), out_dir)
    files += write_config(config, out_dir)
    files += write_generation_config(model, out_dir)
    files += write_tokenizer(tokenizer, out_dir)
    return {"files": sorted(set(files)), "uniform": len(set(adapter.expert_counts().values())) == 1,
            "config_class": type(config).__name__}
