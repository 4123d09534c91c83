"""``genai_config.json``: the file that lets onnxruntime-genai run an exported decoder folder as it is.

    genai_config(spec, model) -> dict        write_genai_config(folder, spec, model) -> file name

onnxruntime-genai reads the graph's I/O names from this file (ours: ``past_key_values.%d.key``,
``present.%d.key``, …), and sizes each layer's cache from the graph's own input shapes, which
:mod:`exporters.onnx` keeps concrete per layer ([batch, kv_heads_i, past_seq, head_dim]); so dense,
uniform and per-layer (pruned) widths load alike. Two settings matter:

* ``type: llama``: every graph we write has the plain decoder contract (ids, mask, positions and a
  key/value pair per layer in; logits and the presents out), which genai's ``llama`` type runs for
  any family; family-specific genai types add inputs our graph does not have.
* ``search.past_present_share_buffer``: a traced graph concatenates the past and the new keys (its
  presents grow by ``seq``), so genai must not hand it one preallocated buffer for both (false); a
  fused graph's GroupQueryAttention writes into the shared buffer in place (true), and has no
  ``position_ids`` input.

The tokenizer files :mod:`exporters.onnx` writes beside the graph are the ones genai's
``Tokenizer`` reads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the runtime side (compress.genai_runtime) reads GENAI_CONFIG_FILE without torch
    from torch import nn

__all__ = ["GENAI_CONFIG_FILE", "genai_config", "write_genai_config"]

GENAI_CONFIG_FILE = "genai_config.json"
DEFAULT_CONTEXT_LENGTH = 2048


def genai_config(spec, model: "nn.Module", filename: str = "model.onnx") -> dict:
    """The config for ``spec`` (a :class:`exporters.onnx.DecoderIOSpec`) of ``model``'s graph.

    context_length and search.max_length: the model's ``max_position_embeddings``; the head counts
    are the dense config's (genai reads the per-layer KV heads from the graph's inputs)."""
    config = model.config
    context = int(getattr(config, "max_position_embeddings", None) or DEFAULT_CONTEXT_LENGTH)
    eos = list(spec.eos_token_id)
    pad = spec.pad_token_id if spec.pad_token_id is not None else (eos[0] if eos else 0)
    bos = spec.bos_token_id if spec.bos_token_id is not None else pad
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask"}
    if spec.graph == "traced":
        inputs["position_ids"] = "position_ids"
    decoder = {
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "filename": filename,
        "head_size": spec.head_dim,
        "hidden_size": int(config.hidden_size),
        "inputs": {
            **inputs,
            "past_key_names": "past_key_values.%d.key",
            "past_value_names": "past_key_values.%d.value",
        },
        "outputs": {
            "logits": "logits",
            "present_key_names": "present.%d.key",
            "present_value_names": "present.%d.value",
        },
        "num_attention_heads": int(config.num_attention_heads),
        "num_hidden_layers": spec.num_layers,
        "num_key_value_heads": max(spec.kv_heads) if spec.kv_heads else 0,
    }
    return {
        "model": {
            "bos_token_id": bos,
            "context_length": context,
            "decoder": decoder,
            "eos_token_id": eos if len(eos) != 1 else eos[0],
            "pad_token_id": pad,
            "type": "llama",
            "vocab_size": spec.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": context,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": spec.graph == "fused",
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def write_genai_config(folder: Path, spec, model: "nn.Module") -> str:
    """Write ``folder/genai_config.json``; returns its file name."""
    path = Path(folder) / GENAI_CONFIG_FILE
    path.write_text(json.dumps(genai_config(spec, model), indent=2) + "\n", encoding="utf-8")
    return GENAI_CONFIG_FILE
