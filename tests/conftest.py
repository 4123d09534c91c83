"""Shared fixtures: tiny random-initialised decoders (fast) and the real SmolLM2 (tests marked real)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GemmaForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)


def _share_cores_among_workers() -> None:
    """Under pytest-xdist (``-n``, set in pyproject.toml) each worker gets its share of the cores, for
    torch's intra-op threads and, through OMP_NUM_THREADS, for the subprocesses the tests start: two
    workers with two threads each on two cores run tiny models many times slower."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


_share_cores_among_workers()

# family -> (config class, causal-LM class, what the family's tiny config sets beyond the common one)
TINY_FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {}),
    "gemma": (GemmaConfig, GemmaForCausalLM, {}),
    "gemma2": (Gemma2Config, Gemma2ForCausalLM, {"sliding_window": 6, "query_pre_attn_scalar": 8,
                                                 "final_logit_softcapping": 5.0, "attn_logit_softcapping": 10.0}),
    "gemma3_text": (Gemma3TextConfig, Gemma3ForCausalLM, {"sliding_window": 6, "query_pre_attn_scalar": 8,
                                        "layer_types": ["sliding_attention", "full_attention"] * 2}),
    "olmo2": (Olmo2Config, Olmo2ForCausalLM, {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}),
    "granite": (GraniteConfig, GraniteForCausalLM, {"embedding_multiplier": 2.0, "residual_multiplier": 0.5,
                                                   "attention_multiplier": 0.2, "logits_scaling": 4.0}),
    "phi3": (Phi3Config, Phi3ForCausalLM, {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}),
}


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
    config_cls, _, family_values = TINY_FAMILIES[family]
    common.update(family_values)
    common.update(overrides)
    return config_cls(**common)


def tiny_model(family: str = "llama", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = tiny_config(family, **overrides)
    model = TINY_FAMILIES[family][1](config).eval()
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


TINY_CALIBRATION = {"source": "austen:persuasion", "samples": 8, "seqlen": 32, "seed": 0, "batch_size": 4}


def tiny_recipe(tmp_path, name: str, passes: list[dict], calibration: bool = True):
    """A parsed recipe that runs ``passes`` on :func:`tiny_smol_folder` (saved in tmp_path/tiny-smol),
    exports to tmp_path/a and evaluates 4 Persuasion windows; returns (model folder, recipe)."""
    from compress.recipe import parse_recipe

    folder = tiny_smol_folder(tmp_path / "tiny-smol")
    recipe = {
        "name": name,
        "model": str(folder),
        "device": "cpu",
        **({"calibration": TINY_CALIBRATION} if calibration else {}),
        "passes": passes,
        "export": {"output": str(tmp_path / "a")},
        "evaluate": {"datasets": ["austen:persuasion"], "seqlen": 32, "max_windows": 4, "batch_size": 2},
        "validate": {"reload_max_abs_diff": 1e-4},
    }
    return folder, parse_recipe(recipe, "test.yaml")


def assert_apply_reproduces(tmp_path, folder):
    """`compress apply` of tmp_path/a/plan.json on the dense ``folder`` writes tmp_path/b with the same
    model.safetensors, bit for bit; returns the replay's result."""
    from compress.run import apply_plan_file

    replay = apply_plan_file(tmp_path / "a" / "plan.json", str(folder), tmp_path / "b", device="cpu", progress=False,
                             evaluate=False)
    assert replay.passed
    assert_same_safetensors(tmp_path / "a" / "model.safetensors", tmp_path / "b" / "model.safetensors")
    return replay


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: intra-op threads only add synchronisation (100× slower on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


REMOTE_LOAD_SCRIPT = """
import sys
sys.modules["compress"] = None  # `import compress` fails: an installed compress would make the check vacuous
import torch
from transformers import AutoModelForCausalLM
out_dir, batch_file, logits_file = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(out_dir, trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
assert not [name for name in sys.modules if name.startswith(("compress.", "exporters"))]
with torch.no_grad():
    torch.save(model(torch.load(batch_file)).logits, logits_file)
"""


def run_without_compress(script: str, arguments: list[str], work_dir) -> None:
    """Run ``script`` in a fresh interpreter (no PYTHONPATH, offline, one thread, its own remote-code
    cache under ``work_dir``); fail with its stderr when it fails. The scripts make `compress`
    unimportable themselves, so an installed compress cannot make the check vacuous."""
    import os
    import subprocess
    import sys

    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(Path(work_dir) / "hf_modules"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-c", script, *arguments], cwd=work_dir, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


def remote_code_logits(out_dir, batch: torch.Tensor, work_dir) -> torch.Tensor:
    """Logits of ``batch`` from the export in ``out_dir``, loaded with trust_remote_code in a fresh
    interpreter that cannot import compress (fails with its stderr otherwise)."""
    work_dir = Path(work_dir)
    torch.save(batch, work_dir / "batch.pt")
    run_without_compress(REMOTE_LOAD_SCRIPT, [str(out_dir), str(work_dir / "batch.pt"), str(work_dir / "logits.pt")],
                         work_dir)
    return torch.load(work_dir / "logits.pt")
