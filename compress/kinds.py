"""Model kinds: which kind of model a source is, read from its files, and what each kind is called.

The kinds are ``decoder`` (LLaMA-family causal LMs), ``moe`` (mixture-of-experts decoders),
``encoder`` (BERT/MiniLM, ViT, DeiT, DINOv2, CLIP towers), ``vlm`` (LLaVA-style) and ``onnx`` (an
ONNX graph). Passes declare the kinds they work on (``kinds``), so a recipe whose passes do not fit
its model is refused before a weight is loaded (``--dry-run`` included).
"""

from __future__ import annotations

from compress.models.loading import SourceInfo, probe_source

KIND_WORDS = {
    "decoder": "decoder",
    "moe": "mixture-of-experts decoder",
    "encoder": "encoder",
    "vlm": "vision-language model",
    "onnx": "ONNX graph",
}
VLM_MODEL_TYPES = ("llava", "pruned_llava")


def kind_of_model_type(model_type: str | None) -> str:
    """The kind of a config ``model_type``; anything not an encoder, MoE or VLM counts as a decoder
    (its adapter then says whether that family is supported)."""
    from compress.models.encoder import ENCODER_MODEL_TYPES
    from compress.models.moe import MOE_MODEL_TYPES

    if model_type in ENCODER_MODEL_TYPES:
        return "encoder"
    if model_type in MOE_MODEL_TYPES:
        return "moe"
    if model_type in VLM_MODEL_TYPES:
        return "vlm"
    return "decoder"


def source_kind(source: str) -> tuple[str, SourceInfo]:
    """(kind, what was read) of a model source, from its files alone; ModelSourceError when the
    source is missing or damaged."""
    info = probe_source(source)
    if info.kind == "onnx":
        return "onnx", info
    return kind_of_model_type(info.model_type), info


def a_kind(kind: str) -> str:
    """``a decoder``, ``an encoder``, ``an ONNX graph``."""
    word = KIND_WORDS[kind]
    return ("an " if word[0].lower() in "aeio" else "a ") + word


def kinds_in_words(kinds) -> str:
    """``("encoder", "vlm")`` -> ``encoders and vision-language models``."""
    words = [KIND_WORDS[k] + "s" for k in kinds]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
