"""Phi-3 with its fused projections unfused: the same network in the Mistral layout.

A Phi-3 layer computes ``qkv_proj`` [(H + 2K)·D, E] and splits it into q, k and v, and
``gate_up_proj`` [2F, E] split into gate and up; otherwise (RMSNorm, SiLU-gated MLP, rotary over
the whole head, a sliding-window mask when the config has one) it is Mistral's layer. Splitting
the fused weights row-wise into separate q/k/v and gate/up linears gives a ``MistralForCausalLM``
with identical logits, which every pass, the surgeon and the exporters handle like any other
member of the LLaMA family; the fused parts are sliced as their parts.

    unfuse_phi3(model) -> MistralForCausalLM   # model: Phi3ForCausalLM, weights moved, not copied

Refused (``ModelSourceError``, before any weight moves): a partial rotary embedding
(``partial_rotary_factor`` < 1, e.g. Phi-4-mini) and a RoPE type other than ``default`` (the
128k Phi-3 models' ``longrope``), which the Mistral layer does not compute the same way.
"""

from __future__ import annotations

import torch
from torch import nn

from compress.errors import ModelSourceError

__all__ = ["PHI3_MODEL_TYPE", "unfuse_phi3"]

PHI3_MODEL_TYPE = "phi3"

# Phi3Config fields that MistralConfig reads with the same meaning.
_SHARED_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
    "use_cache", "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings", "sliding_window",
    "attention_dropout", "rope_parameters",
)


def _refusal(config) -> str | None:
    """Why this Phi-3 config has no exact Mistral form, or None."""
    partial = getattr(config, "partial_rotary_factor", 1.0) or 1.0
    if partial != 1.0:
        return f"partial_rotary_factor is {partial} (only a rotary embedding over the whole head is supported)"
    rope = getattr(config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default") if isinstance(rope, dict) else "default"
    if rope_type != "default":
        return f"rope type {rope_type!r} (only 'default' is supported)"
    return None


def _linear(weight: torch.Tensor) -> nn.Linear:
    """A bias-free Linear [out, in] holding ``weight`` (shared storage is fine: the source is dropped)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta", dtype=weight.dtype)
    linear.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
    return linear


def unfuse_phi3(model: nn.Module) -> nn.Module:
    """The ``MistralForCausalLM`` equal to Phi-3 ``model`` (eval mode, same device and dtype)."""
    from transformers import MistralConfig, MistralForCausalLM

    config = model.config
    problem = _refusal(config)
    if problem:
        raise ModelSourceError(f"model type 'phi3': cannot prune this Phi-3 model: {problem}")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    values = {name: getattr(config, name) for name in _SHARED_FIELDS if hasattr(config, name)}
    mistral_config = MistralConfig(**values, head_dim=head_dim)
    mistral_config.dtype = config.dtype
    with torch.device("meta"):
        mistral = MistralForCausalLM(mistral_config)
    q_width, kv_width = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    for source, target in zip(model.model.layers, mistral.model.layers):
        q, k, v = source.self_attn.qkv_proj.weight.split([q_width, kv_width, kv_width], dim=0)
        gate, up = source.mlp.gate_up_proj.weight.chunk(2, dim=0)
        attn, mlp = target.self_attn, target.mlp
        attn.q_proj, attn.k_proj, attn.v_proj = _linear(q), _linear(k), _linear(v)
        attn.o_proj = source.self_attn.o_proj
        mlp.gate_proj, mlp.up_proj, mlp.down_proj = _linear(gate), _linear(up), source.mlp.down_proj
        target.input_layernorm = source.input_layernorm
        target.post_attention_layernorm = source.post_attention_layernorm
    mistral.model.embed_tokens = model.model.embed_tokens
    mistral.model.norm = model.model.norm
    mistral.lm_head = model.lm_head
    device = model.model.embed_tokens.weight.device
    with torch.device(device):  # the rotary tables are buffers computed from the config, not weights
        mistral.model.rotary_emb = type(mistral.model.rotary_emb)(mistral_config)
    if config.tie_word_embeddings:
        mistral.lm_head.weight = mistral.model.embed_tokens.weight
    mistral.generation_config = model.generation_config
    return mistral.eval()
