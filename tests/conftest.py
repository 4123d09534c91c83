"""Shared fixtures: tiny random-initialised decoders (fast) and the real SmolLM2 (marked slow)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)


def tiny_config(family: str = "llama", **overrides):
    """A 4-layer decoder small enough for unit tests: hidden 64, 8 query heads, 4 KV heads (GQA)."""
    common = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=8,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    common.update(overrides)
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[family]
    return cls(**common)


def tiny_model(family: str = "llama", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = tiny_config(family, **overrides)
    model_cls = {
        "llama": LlamaForCausalLM,
        "mistral": MistralForCausalLM,
        "qwen2": Qwen2ForCausalLM,
        "qwen3": Qwen3ForCausalLM,
    }[family]
    model = model_cls(config).eval()
    # Random init gives near-identical tiny weights; widen them so pruning choices are not ties.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model


@pytest.fixture
def tiny_llama():
    return tiny_model("llama")


@pytest.fixture
def tiny_batch():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 128, (6, 16), generator=g)


def tiny_smol_folder(folder):
    """A tiny random Llama with SmolLM2's vocabulary and tokenizer, saved for recipe runs."""
    from transformers import AutoTokenizer

    from compress.models.loading import embedded_model_folder

    tiny_model(vocab_size=49152).save_pretrained(folder)
    AutoTokenizer.from_pretrained(embedded_model_folder(progress=False)).save_pretrained(folder)
    return folder


def assert_same_safetensors(a, b):
    """Two exported model.safetensors files hold the same tensors, bit for bit."""
    from safetensors.torch import load_file

    first, second = load_file(a), load_file(b)
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
