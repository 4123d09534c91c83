"""Round trips through exporters.safetensors: a hand-pruned in-memory model is exported, reloaded with
`AutoModelForCausalLM.from_pretrained`, and must give the same fp32 logits (max abs diff < 1e-6).

Pruning is simulated here by slicing modules the way the surgeon does (stock HF classes, fewer
rows/columns, `num_key_value_groups` / `intermediate_size` updated, FLAP-style o_proj/down_proj
biases), leaving `model.config` stale on purpose.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import remote_code_logits, tiny_model
from huggingface_hub.errors import StrictDataclassClassValidationError
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen3ForCausalLM

import compress  # noqa: F401  (registers pruned_llama with the Auto classes)
from compress.models.pruned_llama import PrunedLlamaConfig, PrunedLlamaForCausalLM
from exporters.safetensors import export_safetensors

FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]
STOCK_CLASSES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
HEAD_DIM = 8  # tiny models: hidden 64, 8 query heads in 4 KV groups of 2, head_dim 8, MLP 96
GROUP_SIZE = 2
TOLERANCE = 1e-6


# ----------------------------------------------------------------------------------- tiny models


def tiny_qwen3(seed: int = 0, **overrides) -> Qwen3ForCausalLM:
    """A Qwen3 decoder with the conftest tiny shapes (q_norm/k_norm over head_dim 8)."""
    model = tiny_model("qwen3", seed=seed, **overrides)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() != 2:  # norms: move off 1.0 so q_norm/k_norm matter
                parameter.uniform_(0.5, 1.5)
    return model


def make_model(family: str, **overrides) -> nn.Module:
    """Tiny eval-mode *ForCausalLM of `family` (4 layers)."""
    if family == "qwen3":
        return tiny_qwen3(**overrides)
    return tiny_model(family, **overrides)


@pytest.fixture
def batch() -> torch.Tensor:
    """Fixed token ids [6, 16]."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 128, (6, 16), generator=generator)


# ------------------------------------------------------------------------------ simulated pruning


@dataclass(frozen=True)
class LayerCut:
    """What one layer keeps: KV heads, query heads within each kept KV group, MLP channels."""

    keep_kv_heads: tuple[int, ...]
    keep_in_group: tuple[int, ...]
    keep_channels: int
    flap_biases: bool = False


def head_rows(heads: list[int], head_dim: int = HEAD_DIM) -> list[int]:
    """Row indices of q/k/v (columns of o_proj) belonging to `heads`."""
    return [head * head_dim + offset for head in heads for offset in range(head_dim)]


def sliced_linear(linear: nn.Linear, rows=None, columns=None, new_bias: torch.Tensor | None = None) -> nn.Linear:
    """A new Linear holding linear.weight[rows][:, columns]; the bias follows the rows, or is
    `new_bias` [out] when given (a FLAP compensation bias on a linear that had none)."""
    weight = linear.weight.detach()
    bias = None if linear.bias is None else linear.bias.detach()
    if rows is not None:
        weight = weight[rows]
        bias = None if bias is None else bias[rows]
    if columns is not None:
        weight = weight[:, columns]
    if new_bias is not None:
        bias = new_bias
    result = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        result.weight.copy_(weight)
        if bias is not None:
            result.bias.copy_(bias)
    return result


def prune_layer(layer: nn.Module, cut: LayerCut, generator: torch.Generator) -> None:
    """Slice one decoder layer in place as the surgeon would, updating module attributes only."""
    attention, mlp = layer.self_attn, layer.mlp
    query_heads = [kv * GROUP_SIZE + member for kv in cut.keep_kv_heads for member in cut.keep_in_group]
    head_dim = int(attention.head_dim)
    query_rows, kv_rows = head_rows(query_heads, head_dim), head_rows(list(cut.keep_kv_heads), head_dim)
    hidden = attention.o_proj.out_features
    o_bias = torch.randn(hidden, generator=generator) * 0.1 if cut.flap_biases else None
    attention.q_proj = sliced_linear(attention.q_proj, rows=query_rows)
    attention.k_proj = sliced_linear(attention.k_proj, rows=kv_rows)
    attention.v_proj = sliced_linear(attention.v_proj, rows=kv_rows)
    attention.o_proj = sliced_linear(attention.o_proj, columns=query_rows, new_bias=o_bias)
    attention.num_key_value_groups = len(cut.keep_in_group)

    channels = sorted(torch.randperm(mlp.gate_proj.out_features, generator=generator)[: cut.keep_channels].tolist())
    down_bias = torch.randn(hidden, generator=generator) * 0.1 if cut.flap_biases else None
    mlp.gate_proj = sliced_linear(mlp.gate_proj, rows=channels)
    mlp.up_proj = sliced_linear(mlp.up_proj, rows=channels)
    mlp.down_proj = sliced_linear(mlp.down_proj, columns=channels, new_bias=down_bias)
    mlp.intermediate_size = len(channels)


def prune(model: nn.Module, cuts: list[LayerCut]) -> nn.Module:
    """Apply one LayerCut per decoder layer; model.config is left stale."""
    generator = torch.Generator().manual_seed(1)
    for layer, cut in zip(model.model.layers, cuts):
        prune_layer(layer, cut, generator)
    return model.eval()


def uniform_cuts(flap_biases: bool = False, keep_in_group=(1,)) -> list[LayerCut]:
    """Every layer: all 4 KV heads, the given members of each group, 48 of 96 channels."""
    return [LayerCut((0, 1, 2, 3), tuple(keep_in_group), 48, flap_biases) for _ in range(4)]


def non_uniform_cuts() -> list[LayerCut]:
    """All KV heads kept; query heads per group and MLP widths differ per layer; FLAP biases."""
    return [
        LayerCut((0, 1, 2, 3), (0, 1), 96, flap_biases=True),
        LayerCut((0, 1, 2, 3), (1,), 40, flap_biases=True),
        LayerCut((0, 1, 2, 3), (0,), 7, flap_biases=False),
        LayerCut((0, 1, 2, 3), (0, 1), 61, flap_biases=True),
    ]


def kv_varying_cuts() -> list[LayerCut]:
    """KV heads (and with them query groups) differ per layer too."""
    return [
        LayerCut((0, 1, 2, 3), (0, 1), 80, flap_biases=True),
        LayerCut((1, 3), (0, 1), 33, flap_biases=True),
        LayerCut((2,), (1,), 5, flap_biases=False),
        LayerCut((0, 1, 2), (0,), 96, flap_biases=True),
    ]


# ------------------------------------------------------------------------------------- helpers


def logits_of(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """fp32 logits [batch, seq, vocab]."""
    with torch.no_grad():
        return model(batch).logits.float()


def reload(out_dir: Path) -> nn.Module:
    """from_pretrained with the loading report checked: no missing/unexpected/mismatched keys."""
    model, info = AutoModelForCausalLM.from_pretrained(out_dir, output_loading_info=True)
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    assert not info["error_msgs"], info
    return model.eval()


def export_and_compare(model: nn.Module, batch: torch.Tensor, out_dir: Path) -> tuple[dict, nn.Module]:
    """Export, reload, assert equal logits; returns (export result, reloaded model)."""
    result = export_safetensors(model, None, out_dir)
    reloaded = reload(out_dir)
    torch.testing.assert_close(logits_of(reloaded, batch), logits_of(model, batch), rtol=0, atol=TOLERANCE)
    return result, reloaded


def read_config(out_dir: Path) -> dict:
    return json.loads((out_dir / "config.json").read_text())


# --------------------------------------------------------------------------------------- uniform


@pytest.mark.parametrize("family", FAMILIES)
def test_uniform_widths_export_a_stock_config(family, batch, tmp_path):
    model = prune(make_model(family), uniform_cuts())
    result, reloaded = export_and_compare(model, batch, tmp_path)

    config = read_config(tmp_path)
    assert result["uniform"] is True
    assert result["config_class"] == type(model.config).__name__
    assert config["model_type"] == family
    assert config["architectures"] == [STOCK_CLASSES[family]]
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 4)
    assert (config["intermediate_size"], config["head_dim"]) == (48, HEAD_DIM)
    assert type(reloaded).__name__ == STOCK_CLASSES[family]
    assert "auto_map" not in config
    assert result["files"] == ["config.json", "generation_config.json", "model.safetensors"]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_uniform_flap_biases_use_stock_bias_flags_with_zero_fill(family, batch, tmp_path):
    model = prune(make_model(family), uniform_cuts(flap_biases=family == "llama"))
    if family == "qwen3":  # Qwen3 has attention_bias but no mlp_bias: only an o_proj bias fits
        for layer in model.model.layers:
            layer.mlp.down_proj.bias = None
            layer.self_attn.o_proj.bias = nn.Parameter(torch.randn(64) * 0.1)
    result, reloaded = export_and_compare(model, batch, tmp_path)

    config = read_config(tmp_path)
    assert config["model_type"] == family
    assert config["attention_bias"] is True
    assert config.get("mlp_bias", False) is (family == "llama")
    zero_filled = reloaded.model.layers[0].self_attn.q_proj.bias
    assert zero_filled is not None and torch.count_nonzero(zero_filled) == 0


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_uniform_biases_a_stock_config_cannot_hold_fall_back_to_pruned_config(family, batch, tmp_path):
    model = prune(make_model(family), uniform_cuts(flap_biases=True))
    result, reloaded = export_and_compare(model, batch, tmp_path)

    assert result["uniform"] is True
    assert result["config_class"] == "PrunedLlamaConfig"
    assert "cannot hold biases" in result["stock_config_reason"]
    assert isinstance(reloaded, PrunedLlamaForCausalLM)


def test_uniform_llama_heads_not_dividing_hidden_size_fall_back(batch, tmp_path):
    # 3 KV heads x 2 = 6 query heads; LlamaConfig insists hidden_size (64) % heads == 0.
    cuts = [LayerCut((0, 1, 3), (0, 1), 48) for _ in range(4)]
    model = prune(make_model("llama"), cuts)
    result, _ = export_and_compare(model, batch, tmp_path)

    assert result["uniform"] is True
    assert result["config_class"] == "PrunedLlamaConfig"
    assert "rejects these widths" in result["stock_config_reason"]


# ----------------------------------------------------------------------------------- non-uniform


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("cuts", [non_uniform_cuts(), kv_varying_cuts()], ids=["heads_and_mlp", "kv_heads_too"])
def test_non_uniform_widths_export_pruned_config(family, cuts, batch, tmp_path):
    model = prune(make_model(family), cuts)
    result, reloaded = export_and_compare(model, batch, tmp_path)

    config = read_config(tmp_path)
    assert result["uniform"] is False
    assert result["config_class"] == "PrunedLlamaConfig"
    assert "pruned_llama.py" in result["files"]
    assert config["model_type"] == "pruned_llama"
    assert config["base_model_type"] == family
    assert config["auto_map"] == {
        "AutoConfig": "pruned_llama.PrunedLlamaConfig",
        "AutoModelForCausalLM": "pruned_llama.PrunedLlamaForCausalLM",
    }
    assert config["num_attention_heads_per_layer"] == [len(c.keep_kv_heads) * len(c.keep_in_group) for c in cuts]
    assert config["num_key_value_heads_per_layer"] == [len(c.keep_kv_heads) for c in cuts]
    assert config["intermediate_size_per_layer"] == [c.keep_channels for c in cuts]
    assert config["o_proj_bias"] is True and config["down_proj_bias"] is True
    assert isinstance(reloaded, PrunedLlamaForCausalLM)
    for layer in reloaded.model.layers:
        attention = layer.self_attn
        assert attention.num_key_value_groups == attention.q_proj.out_features // attention.k_proj.out_features
        assert layer.mlp.intermediate_size == layer.mlp.gate_proj.out_features


@pytest.mark.parametrize("family", FAMILIES)
def test_reloaded_kv_varying_model_generates_like_the_in_memory_one(family, batch, tmp_path):
    model = prune(make_model(family), kv_varying_cuts())
    export_safetensors(model, None, tmp_path)
    reloaded = reload(tmp_path)

    prompt = batch[:2, :5]
    settings = dict(max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(prompt), pad_token_id=0)
    assert torch.equal(reloaded.generate(prompt, **settings), model.generate(prompt, **settings))


def test_untied_embeddings_keep_their_own_lm_head(batch, tmp_path):
    model = prune(make_model("mistral", tie_word_embeddings=False), non_uniform_cuts())
    export_and_compare(model, batch, tmp_path)
    assert read_config(tmp_path)["tie_word_embeddings"] is False


def test_reexporting_a_loaded_pruned_model_round_trips(batch, tmp_path):
    model = prune(make_model("qwen2"), kv_varying_cuts())
    export_safetensors(model, None, tmp_path / "first")
    loaded = reload(tmp_path / "first")

    result, _ = export_and_compare(loaded, batch, tmp_path / "second")
    assert result["config_class"] == "PrunedLlamaConfig"
    assert read_config(tmp_path / "second")["base_model_type"] == "qwen2"


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_uniform_pruned_llama_model_exports_back_to_a_stock_config(family, batch, tmp_path):
    base_fields = dict(sliding_window=8) if family == "mistral" else dict(use_sliding_window=False)
    config = pruned_config(
        base_model_type=family,
        vocab_size=128,
        num_attention_heads_per_layer=[4] * 4,
        num_key_value_heads_per_layer=[2] * 4,
        intermediate_size_per_layer=[40] * 4,
        q_proj_bias=family == "qwen2",
        k_proj_bias=family == "qwen2",
        v_proj_bias=family == "qwen2",
        **base_fields,
    )
    torch.manual_seed(0)
    model = PrunedLlamaForCausalLM(config).eval()
    result, reloaded = export_and_compare(model, batch, tmp_path)

    written = read_config(tmp_path)
    assert result["config_class"] == STOCK_CLASSES[family].replace("ForCausalLM", "Config")
    assert written["model_type"] == family and type(reloaded).__name__ == STOCK_CLASSES[family]
    assert "num_attention_heads_per_layer" not in written and "base_model_type" not in written
    if family == "mistral":
        assert written["sliding_window"] == 8


# ------------------------------------------------------------------ stale config, inconsistencies


def test_stale_model_config_does_not_leak_into_the_export(batch, tmp_path):
    model = prune(make_model("llama"), uniform_cuts())
    model.config.intermediate_size = 9999  # stale or even wrong: never consulted for widths
    assert model.config.num_attention_heads == 8

    export_and_compare(model, batch, tmp_path)
    config = read_config(tmp_path)
    assert (config["num_attention_heads"], config["intermediate_size"]) == (4, 48)


def test_stale_num_key_value_groups_is_reported(tmp_path):
    model = prune(make_model("llama"), non_uniform_cuts())
    model.model.layers[2].self_attn.num_key_value_groups = 2  # weights hold 4 heads over 4 KV heads
    with pytest.raises(ValueError, match="layer 2: self_attn.num_key_value_groups is 2"):
        export_safetensors(model, None, tmp_path)


# ------------------------------------------------------------------------------------ remote code

@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_remote_code_loads_without_the_compress_package(family, batch, tmp_path):
    model = prune(make_model(family), kv_varying_cuts())
    out_dir = tmp_path / "export"
    export_safetensors(model, None, out_dir)
    remote_logits = remote_code_logits(out_dir, batch, tmp_path)
    torch.testing.assert_close(remote_logits, logits_of(model, batch), rtol=0, atol=TOLERANCE)


def run_python(script: str, arguments: list[str], *, cwd: Path, env: dict) -> None:
    """Run ``script`` in a fresh interpreter and fail with its stderr if it fails."""
    run = subprocess.run(
        [sys.executable, "-c", script, *arguments], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]


BOTH_PATHS_SCRIPT = """
import sys
import compress
from compress.models.pruned_llama import PrunedLlamaConfig, PrunedLlamaForCausalLM
from transformers import AutoConfig, AutoModelForCausalLM
out_dir = sys.argv[1]
trusted = AutoModelForCausalLM.from_pretrained(out_dir, trust_remote_code=True)
assert type(trusted) is PrunedLlamaForCausalLM, type(trusted)
untrusted = AutoModelForCausalLM.from_pretrained(out_dir)
assert type(untrusted) is PrunedLlamaForCausalLM, type(untrusted)
assert type(AutoConfig.for_model("pruned_llama")) is PrunedLlamaConfig
assert not [name for name in sys.modules if name.startswith("transformers_modules.")]
"""


def test_with_compress_imported_its_classes_win_over_the_copied_code(tmp_path):
    """transformers prefers registered non-transformers classes even with trust_remote_code=True."""
    model = prune(make_model("llama"), non_uniform_cuts())
    export_safetensors(model, None, tmp_path / "export")

    repo_root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(repo_root), HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_HUB_OFFLINE="1")
    run_python(BOTH_PATHS_SCRIPT, [str(tmp_path / "export")], cwd=tmp_path, env=env)


# ------------------------------------------------------------------------------ tokenizer, config


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over "w0" … "w126" + "[UNK]" (128 ids, matching the tiny vocab)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{index}": index for index in range(127)} | {"[UNK]": 127}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


def test_tokenizer_is_saved_beside_the_weights(tmp_path):
    model = prune(make_model("llama"), non_uniform_cuts())
    result = export_safetensors(model, tiny_tokenizer(), tmp_path)

    assert {"tokenizer.json", "tokenizer_config.json"} <= set(result["files"])
    assert all((tmp_path / name).is_file() for name in result["files"])


def pruned_config(**overrides) -> PrunedLlamaConfig:
    values = dict(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=HEAD_DIM,
        num_attention_heads_per_layer=[8, 4, 2, 6],
        num_key_value_heads_per_layer=[4, 2, 1, 3],
        intermediate_size_per_layer=[96, 40, 7, 61],
    )
    values.update(overrides)
    return PrunedLlamaConfig(**values)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            dict(intermediate_size_per_layer=[96, 40, 7]),
            "intermediate_size_per_layer has 3 entries but num_hidden_layers is 4",
        ),
        (
            dict(num_attention_heads_per_layer=[8, 4, 3, 6], num_key_value_heads_per_layer=[4, 2, 2, 3]),
            "layer 2: 3 query heads are not a multiple of 2",
        ),
        (dict(num_attention_heads_per_layer=[8, 0, 2, 6]), "must be >= 1 in every layer; layers \\[1\\]"),
        (dict(base_model_type="gpt2"), "base_model_type must be one of"),
    ],
)
def test_pruned_config_rejects_inconsistent_widths(overrides, message):
    with pytest.raises(StrictDataclassClassValidationError, match=message):
        pruned_config(**overrides)


def test_pruned_config_lists_default_to_the_dense_widths():
    config = PrunedLlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2)
    assert config.num_attention_heads_per_layer == [8, 8]
    assert config.num_key_value_heads_per_layer == [2, 2]
    assert config.intermediate_size_per_layer == [config.intermediate_size] * 2


def test_pruned_model_builds_on_the_meta_device():
    with torch.device("meta"):
        model = PrunedLlamaForCausalLM(pruned_config(base_model_type="qwen3", o_proj_bias=True))
    attention = model.model.layers[2].self_attn
    assert attention.q_proj.weight.shape == (2 * HEAD_DIM, 64) and attention.q_proj.weight.is_meta
    assert attention.o_proj.bias.shape == (64,)
    assert model.model.layers[3].mlp.down_proj.weight.shape == (64, 61)
