"""The adapter of a model, from one table: architecture knowledge lives in one adapter per family.

An adapter names a model's parts (layers, attention and MLP linears, their consumers), reads and
prices its widths, and counts its parameters; the pruning parts only talk to adapters.
"""

from __future__ import annotations

from torch import nn

from compress.errors import CompressError
from compress.models.encoder import ENCODER_MODEL_TYPES, EncoderAdapter, encoder_family
from compress.models.llama import SUPPORTED_MODEL_TYPES, LlamaFamilyAdapter
from compress.models.moe import MOE_MODEL_TYPES, MoeAdapter


def get_adapter(model: nn.Module):
    """The adapter for ``model``: LLaMA-family decoders, the MoE adapter for Mixtral / Qwen-MoE, the
    encoder adapter for BERT / ViT / DeiT / DINOv2 / CLIP towers; a clear error for architectures
    without one."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in MOE_MODEL_TYPES:
        return MoeAdapter(model)
    if encoder_family(model) is not None:
        return EncoderAdapter(model)
    if model_type not in SUPPORTED_MODEL_TYPES or not hasattr(model, "model"):
        raise CompressError(
            f"no adapter for model type {model_type!r} ({type(model).__name__}); "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES + MOE_MODEL_TYPES + ENCODER_MODEL_TYPES)}"
        )
    return LlamaFamilyAdapter(model)
