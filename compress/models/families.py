"""The decoder families compress prunes and what each adds to the LLaMA layout (no torch here: the
recipe preflight and ``--dry-run`` read it without loading a model).

``DECODER_FAMILIES``: config ``model_type`` -> what matters to pruning. The adapter
(:mod:`compress.models.llama`) serves every entry; ``pruned_llama`` rebuilds each with per-layer
widths. ``GGUF_ARCHITECTURES``: a GGUF's ``general.architecture`` -> the ``model_type``
transformers loads it as, where the two differ.
"""

from __future__ import annotations

DECODER_FAMILIES = {
    "llama": "LLaMA layout",
    "mistral": "sliding-window attention",
    "qwen2": "q/k/v biases (Qwen2, Qwen2.5)",
    "qwen3": "per-head q/k RMSNorm",
    "gemma": "head_dim not hidden/heads, scaled embeddings",
    "gemma2": "soft-capping, sliding-window layers, sandwich norms",
    "gemma3_text": "per-head q/k RMSNorm, sliding-window layers, one KV head (270M)",
    "olmo2": "q/k RMSNorm over the whole projection (sliced with the heads)",
    "granite": "embedding, residual, attention and logit multipliers",
    "phi3": "fused qkv_proj and gate_up_proj (unfused at load into the Mistral layout)",
    "pruned_llama": "per-layer widths (compress)",
}

GGUF_ARCHITECTURES = {"gemma3": "gemma3_text"}

# Families the GGUF writer (exporters/gguf.py) holds: llama.cpp's `llama` and `deci` graphs.
GGUF_FAMILIES = ("llama", "mistral", "pruned_llama")

# Families whose layer the fused ONNX writer (exporters/onnx_fused.py) emits as it is (RMSNorm,
# rotate-half rotary, SiLU-gated MLP, optional biases); a pruned_llama is judged by its base.
FUSED_ONNX_FAMILIES = ("llama", "mistral", "qwen2")


def unsupported_decoder(model_type: str | None) -> str | None:
    """Why a decoder of ``model_type`` cannot be pruned (naming the supported ones), or None."""
    if model_type is None or model_type in DECODER_FAMILIES:
        return None
    return f"no adapter for model type {model_type!r}; supported decoders: {', '.join(DECODER_FAMILIES)}"


__all__ = ["DECODER_FAMILIES", "FUSED_ONNX_FAMILIES", "GGUF_ARCHITECTURES", "GGUF_FAMILIES", "unsupported_decoder"]
