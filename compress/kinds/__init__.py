"""Model kinds, chosen once per run from one table.

A kind is read from the model source's files alone (no weights loaded): an ``.onnx`` file is an
ONNX graph; otherwise the config's ``model_type`` says encoder (BERT/MiniLM, ViT, DeiT, DINOv2,
CLIP towers), mixture-of-experts decoder, LLaVA-style VLM, or decoder. Each kind is a strategy
class (:mod:`compress.kinds.base`) that the runner drives through the same stages; a decoder run
with ``max_memory`` takes the streamed decoder (one block in memory at a time). Passes declare the
kinds they work on (``kinds``), so a recipe whose passes do not fit its model is refused before a
weight is loaded (``--dry-run`` included).
"""

from __future__ import annotations

from compress.errors import CompressError
from compress.kinds.base import ModelKind
from compress.kinds.decoder import DecoderKind, MoeDecoderKind
from compress.kinds.decoder_streamed import StreamedDecoderKind
from compress.kinds.encoder import EncoderKind
from compress.kinds.onnx_graph import OnnxGraphKind
from compress.kinds.vlm import VlmKind
from compress.models.encoder import ENCODER_MODEL_TYPES
from compress.models.loading import SourceInfo, probe_source
from compress.models.moe import MOE_MODEL_TYPES

# kind name -> (in-memory strategy, streamed strategy or None)
KINDS: dict[str, tuple[type[ModelKind], type[ModelKind] | None]] = {
    "decoder": (DecoderKind, StreamedDecoderKind),
    "moe": (MoeDecoderKind, None),
    "encoder": (EncoderKind, None),
    "vlm": (VlmKind, None),
    "onnx": (OnnxGraphKind, None),
}
KIND_WORDS = {name: strategies[0].words for name, strategies in KINDS.items()}
VLM_MODEL_TYPES = ("llava", "pruned_llava")


def kind_class(name: str, streamed: bool = False) -> type[ModelKind]:
    """The strategy of kind ``name``, out of core when ``streamed``."""
    in_memory, out_of_core = KINDS[name]
    if not streamed:
        return in_memory
    if out_of_core is None:
        raise CompressError(f"max_memory: out-of-core runs take decoders; this model is {a_kind(name)}")
    return out_of_core


def kind_of_model_type(model_type: str | None) -> str:
    """The kind of a config ``model_type``; anything not an encoder, MoE or VLM counts as a decoder
    (its adapter then says whether that family is supported)."""
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


__all__ = ["KINDS", "KIND_WORDS", "ModelKind", "a_kind", "kind_class", "kind_of_model_type", "kinds_in_words",
           "source_kind"]
