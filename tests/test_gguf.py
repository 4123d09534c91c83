"""GGUF for llama.cpp: the file's layout read back with the gguf package (always), and llama.cpp
itself through llama-cpp-python when it was built (scripts/build_llama_cpp.sh)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from test_export import kv_varying_cuts, make_model, non_uniform_cuts, prune

from compress.errors import CompressError
from exporters.gguf import GgufOptions, _permute, export_gguf

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None


class ByteTokenizer:
    """A 128-token BPE tokenizer stand-in for the tiny models (vocab 128)."""

    def __init__(self):
        from tokenizers import Tokenizer, models

        vocab = {"a": 0, "b": 1, "ab": 2, **{f"t{i}": i for i in range(3, 128)}}
        self._tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
        self.bos_token_id, self.eos_token_id, self.pad_token_id, self.unk_token_id = 1, 2, 2, 0

    def save_pretrained(self, folder):
        self._tokenizer.save(f"{folder}/tokenizer.json")


def tensors(path) -> dict:
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {t.name: t for t in reader.tensors}, reader.fields


def unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def test_per_layer_widths_are_written_as_deci_with_permuted_rotary_rows(tmp_path):
    model = prune(make_model("llama"), kv_varying_cuts())  # KV heads [4, 2, 1, 3], FLAP biases
    exported = export_gguf(model, ByteTokenizer(), tmp_path, GgufOptions("f32"))
    assert exported.architecture == "deci"
    found, fields = tensors(tmp_path / "model.gguf")
    assert list(fields["deci.attention.head_count_kv"].contents()) == [4, 2, 1, 3]
    assert list(fields["deci.feed_forward_length"].contents()) == [80, 33, 5, 96]
    for i, layer in enumerate(model.model.layers):
        attention = layer.self_attn
        kv = attention.k_proj.out_features // 8
        q = np.asarray(found[f"blk.{i}.attn_q.weight"].data).reshape(attention.q_proj.weight.shape)
        k = np.asarray(found[f"blk.{i}.attn_k.weight"].data).reshape(attention.k_proj.weight.shape)
        np.testing.assert_array_equal(unpermute(q, attention.q_proj.out_features // 8), attention.q_proj.weight.detach().numpy())
        np.testing.assert_array_equal(unpermute(k, kv), attention.k_proj.weight.detach().numpy())
        assert (f"blk.{i}.attn_output.bias" in found) == (attention.o_proj.bias is not None)
    assert "output.weight" not in found  # tied: llama.cpp reads token_embd


def test_uniform_widths_without_biases_are_plain_llama_and_quantized_types_fall_back_per_tensor(tmp_path):
    from test_export import uniform_cuts

    model = prune(make_model("llama"), uniform_cuts())  # 48 channels: not a multiple of the 32-wide blocks
    exported = export_gguf(model, ByteTokenizer(), tmp_path, GgufOptions("q8_0"))
    assert exported.architecture == "llama"
    found, fields = tensors(tmp_path / "model.gguf")
    assert int(fields["llama.attention.head_count"].contents()) == 4
    assert found["blk.0.ffn_gate.weight"].tensor_type.name == "Q8_0"  # input width 64
    assert found["blk.0.ffn_down.weight"].tensor_type.name == "F16"  # input width 48
    assert found["blk.0.attn_norm.weight"].tensor_type.name == "F32"


def test_permute_is_the_llama_cpp_interleave():
    weight = np.arange(2 * 8 * 3, dtype=np.float32).reshape(16, 3)  # 2 heads of head_dim 8
    out = _permute(weight, 2)
    # row j of a head (j < 4: first half, j >= 4: second half) goes to 2j or 2(j - 4) + 1
    np.testing.assert_array_equal(out[1], weight[4])
    np.testing.assert_array_equal(out[2], weight[1])
    np.testing.assert_array_equal(unpermute(out, 2), weight)


def test_models_gguf_cannot_hold_are_refused_before_writing(tmp_path):
    model = make_model("llama")
    with pytest.raises(CompressError, match="lists 49152 tokens but the embedding has 128 rows"):
        from transformers import AutoTokenizer

        from compress.models.loading import embedded_model_folder

        export_gguf(model, AutoTokenizer.from_pretrained(embedded_model_folder(progress=False)), tmp_path / "a")
    assert not (tmp_path / "a" / "model.gguf").exists()
    with pytest.raises(CompressError, match="export.gguf.dtype"):
        export_gguf(model, ByteTokenizer(), tmp_path / "b", GgufOptions("q5_k"))


@pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not built (scripts/build_llama_cpp.sh)")
@pytest.mark.parametrize("cuts", [kv_varying_cuts, non_uniform_cuts])
def test_llama_cpp_loads_the_pruned_gguf_and_matches_torch(cuts, tmp_path):
    from compress.llama_cpp_runtime import LlamaCppDecoder

    model = prune(make_model("llama"), cuts())
    export_gguf(model, ByteTokenizer(), tmp_path, GgufOptions("f32"))
    decoder = LlamaCppDecoder(tmp_path / "model.gguf", n_ctx=64)
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids).logits[0].numpy()
    assert np.abs(decoder.logits(ids[0].tolist()) - reference).max() < 1e-3
