"""Out-of-core pruning (compress.outofcore): the same weights as in memory, one block at a time."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import compress  # noqa: F401  (registers pruned_llama)
from compress.calibration.streaming import DiskActivations
from compress.checkpoint import CheckpointReader, ShardedWriter, StreamedTensor, write_safetensors
from compress.cli import app
from compress.errors import CompressError, RecipeError
from compress.memory import MemoryBudget, parse_size
from compress.run import run_recipe
from compress.recipe import parse_recipe
from conftest import tiny_model, tiny_smol_folder

runner = CliRunner()


@pytest.fixture(scope="module")
def sharded_folder(tmp_path_factory):
    """A tiny Llama with SmolLM2's tokenizer, untied lm_head, saved in three shards with an index."""
    from transformers import AutoTokenizer

    from compress.models.loading import embedded_model_folder

    folder = tmp_path_factory.mktemp("tiny-sharded")
    tiny_model(vocab_size=49152, tie_word_embeddings=False).save_pretrained(folder, max_shard_size="2MB")
    AutoTokenizer.from_pretrained(embedded_model_folder(progress=False)).save_pretrained(folder)
    assert (folder / "model.safetensors.index.json").is_file()
    return folder


@pytest.fixture(scope="module")
def tied_folder(tmp_path_factory):
    """The tiny SmolLM2-vocabulary Llama with tied embeddings, one model.safetensors."""
    return tiny_smol_folder(tmp_path_factory.mktemp("tiny-tied"))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """A short calibration text (tokenising the whole Austen corpus takes seconds)."""
    from compress.calibration.sources import read_text

    path = tmp_path_factory.mktemp("text") / "calibration.txt"
    path.write_text(read_text("austen:persuasion")[:20000], encoding="utf-8")
    return path


def recipe_data(folder, output, text_file, passes, **overrides) -> dict:
    data = {
        "name": "tiny",
        "model": str(folder),
        "device": "cpu",
        "calibration": {"source": str(text_file), "samples": 8, "seqlen": 16, "seed": 0, "batch_size": 3},
        "passes": passes,
        "export": {"output": str(output)},
        "evaluate": False,
    }
    data.update(overrides)
    return data


def tensors_of(folder) -> dict[str, torch.Tensor]:
    reader = CheckpointReader(folder)
    return {name: tensor.clone() for name, tensor in reader.read(reader.names()).items()}


def assert_same_weights(a, b) -> None:
    first, second = tensors_of(a), tensors_of(b)
    assert first.keys() == second.keys()
    for key in first:
        assert first[key].dtype == second[key].dtype, key
        assert torch.equal(first[key], second[key]), key


CASES = {
    # data-free, global allocation (two sweeps), no calibration section at all
    "magnitude_sp-global": ([{"magnitude_sp": {"ratio": 0.4, "allocator": "global"}}], {"calibration": None}),
    # calibrated, uniform, sequential (the pruned block feeds the next)
    "wanda_sp": ([{"wanda_sp": {"ratio": 0.4}}], {}),
    # calibrated, global AL-AM with bias compensation (two sweeps, re-reading each block)
    "flap": ([{"flap": {"ratio": 0.4}}], {}),
    # calibrated, global, sequential: widths from the dense sweep, then each block re-scored on the
    # pruned blocks' outputs
    "flap-sequential": ([{"flap": {"ratio": 0.4, "sequential": True}}], {}),
    # calibrated, uniform UL-UM with bias compensation, query-head units
    "flap-ul-um": ([{"flap": {"ratio": 0.3, "structure": "ul-um", "gqa": "query_heads"}}], {}),
}


@pytest.mark.parametrize("case, source", [(case, "sharded") for case in CASES]
                         + [("flap", "tied"), ("magnitude_sp-global", "tied")])
def test_out_of_core_writes_the_in_memory_weights(case, source, sharded_folder, tied_folder, text_file, tmp_path,
                                                  one_thread):
    """Sharded source with an untied lm_head (copied), or one model.safetensors with tied embeddings."""
    folder = sharded_folder if source == "sharded" else tied_folder
    passes, extra = CASES[case]
    in_memory = run_recipe(parse_recipe(recipe_data(folder, tmp_path / "mem", text_file, passes, **extra), "t.yaml"),
                           progress=False)
    streamed = run_recipe(parse_recipe(recipe_data(folder, tmp_path / "ooc", text_file, passes, max_memory="16GiB",
                                                   **extra), "t.yaml"), progress=False)
    assert in_memory.passed and streamed.passed, streamed.failures
    assert (tmp_path / "ooc" / "model.safetensors.index.json").is_file()
    assert_same_weights(tmp_path / "mem", tmp_path / "ooc")
    for name in ("config.json", "generation_config.json", "plan.json"):
        assert json.loads((tmp_path / "mem" / name).read_text()) == json.loads((tmp_path / "ooc" / name).read_text())
    section = streamed.report["out_of_core"]
    assert section["activations"] == ("none (data-free)" if case.startswith("magnitude") else "ram")
    assert {g["name"] for g in streamed.report["validation"]["gates"]} == {"reload_structure", "peak_rss_mb"}
    assert streamed.report["params"] == in_memory.report["params"]
    assert not any(p.name.startswith(".ooc") for p in tmp_path.iterdir())


def test_the_sharded_output_loads_with_from_pretrained(sharded_folder, text_file, tmp_path, one_thread):
    data = recipe_data(sharded_folder, tmp_path / "ooc", text_file, [{"flap": {"ratio": 0.4}}], max_memory="16GiB")
    assert run_recipe(parse_recipe(data, "t.yaml"), progress=False).passed
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ooc").eval()
    assert type(reloaded).__name__ == "PrunedLlamaForCausalLM"  # AL-AM widths differ per layer
    ids = torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert reloaded(ids).logits.isfinite().all()


def test_offloaded_activations_give_the_same_weights(sharded_folder, text_file, tmp_path, one_thread, monkeypatch):
    written = []
    original_put = DiskActivations.put
    monkeypatch.setattr(DiskActivations, "put", lambda self, b, h: (written.append(b), original_put(self, b, h)))
    passes = [{"wanda_sp": {"ratio": 0.4}}]
    ram = parse_recipe(recipe_data(sharded_folder, tmp_path / "ram", text_file, passes, max_memory="16GiB"), "t.yaml")
    disk = parse_recipe(recipe_data(sharded_folder, tmp_path / "disk", text_file, passes, max_memory="16GiB",
                                    offload_dir=str(tmp_path / "acts")), "t.yaml")
    assert run_recipe(ram, progress=False).passed and not written
    result = run_recipe(disk, progress=False)
    assert result.passed
    assert result.report["out_of_core"]["activations"] == "disk"
    assert len(written) == 3 + 4 * 3  # 3 batches captured, then each of 4 blocks rewrites them
    assert list((tmp_path / "acts").iterdir()) == []  # the run's activation folder is removed
    assert_same_weights(tmp_path / "ram", tmp_path / "disk")


def test_disk_activations_round_trip(tmp_path):
    store = DiskActivations(tmp_path / "acts")
    first, second = torch.randn(2, 5, 8), torch.randn(2, 5, 8).to(torch.bfloat16)
    store.append(first)
    store.append(second)
    assert len(store) == 2 and torch.equal(store.get(0), first) and torch.equal(store.get(1), second)
    store.put(0, second)
    assert torch.equal(store.get(0), second)
    assert sorted(p.name for p in (tmp_path / "acts").iterdir()) == ["batch-00000.safetensors", "batch-00001.safetensors"]
    store.close()
    assert not (tmp_path / "acts").exists()


def test_a_cap_too_small_fails_with_a_clear_message(sharded_folder, text_file, tmp_path):
    path = tmp_path / "r.yaml"
    import yaml

    path.write_text(yaml.safe_dump(recipe_data(sharded_folder, tmp_path / "out", text_file, [{"flap": {"ratio": 0.4}}])))
    result = runner.invoke(app, ["run", str(path), "--max-memory", "64MiB", "-q"])
    assert result.exit_code == 2, result.output
    assert "max_memory 64.0 MiB is too small for one block plus its activations" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    bad = runner.invoke(app, ["run", str(path), "--max-memory", "lots"])
    assert bad.exit_code == 2 and "expected a size such as 1GiB" in bad.output


def test_memory_budget_decides_ram_disk_or_refuses():
    budget = MemoryBudget(base=100, block=50, forward=20, activations=200, batch_activations=10)
    assert budget.needed(offload=False) == 100 + 100 + 20 + 210 and budget.needed(offload=True) == 240
    assert budget.decide(1000, offload_requested=False) is False
    assert budget.decide(1000, offload_requested=True) is True
    assert budget.decide(300, offload_requested=False) is True  # does not fit in RAM, fits on disk
    with pytest.raises(CompressError, match="too small"):
        budget.decide(200, offload_requested=False)
    assert parse_size("1GiB") == 2**30 and parse_size(512) == 512


@pytest.mark.parametrize("overrides, where, message", [
    ({"passes": [{"cfsp": {"ratio": 0.2}}]}, "passes[0]", "pass cfsp does not run out of core"),
    ({"passes": [{"flap": {"ratio": 0.2}}, {"magnitude_sp": {"ratio": 0.2}}]}, "passes", "exactly one pruning pass"),
    ({"passes": [{"flap": {"ratio": 0.2, "compensation": "least_squares"}}]}, "passes[0].flap.compensation",
     "least_squares does not run out of core"),
    ({"export": {"formats": ["safetensors", "onnx"]}}, "export.formats", "writes safetensors only"),
    ({"max_memory": None, "offload_dir": "x"}, "offload_dir", "set max_memory too"),
    ({"max_memory": "lots"}, "max_memory", ""),
])
def test_recipes_that_cannot_run_out_of_core_are_refused_by_field(overrides, where, message, tmp_path, text_file):
    data = recipe_data("smollm2-135m", tmp_path / "out", text_file, [{"flap": {"ratio": 0.2}}], max_memory="1GiB")
    data.update(overrides)
    with pytest.raises(RecipeError) as error:
        parse_recipe(data, "r.yaml")
    lines = [line for line in str(error.value).splitlines() if line.startswith(f"r.yaml: {where}: ")]
    assert lines and message in lines[0], str(error.value)


def test_streamed_safetensors_files_read_back_exactly(tmp_path):
    big = torch.randn(10, 6)
    half = torch.randn(3, 4).to(torch.bfloat16)
    streamed = StreamedTensor(torch.float32, (10, 6), lambda: iter(big.split(3)))
    write_safetensors(tmp_path / "a.safetensors", {"big": streamed, "half": half, "empty": torch.zeros(0)})
    back = load_file(tmp_path / "a.safetensors")
    assert torch.equal(back["big"], big) and torch.equal(back["half"], half) and back["empty"].numel() == 0

    writer = ShardedWriter(tmp_path / "ckpt")
    writer.add({"a.weight": big})
    writer.add({"b.weight": half, "c.bias": torch.arange(5, dtype=torch.float32)})
    files = writer.finish()
    assert files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                     "model.safetensors.index.json"]
    reader = CheckpointReader(tmp_path / "ckpt")
    assert reader.names() == ["a.weight", "b.weight", "c.bias"] and reader.info("a.weight").shape == (10, 6)
    ids = torch.tensor([9, 0, 3, 3, 7])
    assert torch.equal(reader.gather_rows("a.weight", ids, chunk_bytes=48), big[ids])  # two rows per chunk
    assert torch.equal(reader.read_rows("a.weight", 2, 5), big[2:5])


def test_a_checkpoint_that_does_not_match_its_config_is_refused(tmp_path):
    from compress.errors import ModelSourceError
    from compress.outofcore import StreamingModel

    model = tiny_model(vocab_size=200)
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["model.layers.2.mlp.up_proj.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ModelSourceError, match="lacks 1 tensor"):
        StreamingModel(tmp_path)


def test_a_data_free_run_checks_the_cap_too(tied_folder, tmp_path):
    data = recipe_data(tied_folder, tmp_path / "out", None, [{"magnitude_sp": {"ratio": 0.3}}], calibration=None,
                       max_memory="32MiB")
    with pytest.raises(CompressError, match="max_memory 32.0 MiB is too small"):
        run_recipe(parse_recipe(data, "t.yaml"), progress=False)
    assert not (tmp_path / "out").exists()


def test_out_of_core_gemma3_writes_the_in_memory_weights(text_file, tmp_path, one_thread):
    """Gemma 3's scaled embeddings (the streamed rows are scaled as the module scales them) and its
    sliding / global layers (each block gets its own mask and rotary table)."""
    from transformers import AutoTokenizer

    from compress.models.loading import embedded_model_folder

    folder = tmp_path / "gemma"
    tiny_model("gemma3_text", vocab_size=49152, sliding_window=6, query_pre_attn_scalar=8,
               layer_types=["sliding_attention", "full_attention"] * 2).save_pretrained(folder)
    AutoTokenizer.from_pretrained(embedded_model_folder(progress=False)).save_pretrained(folder)
    passes = [{"flap": {"ratio": 0.4, "sequential": True}}]
    in_memory = run_recipe(parse_recipe(recipe_data(folder, tmp_path / "mem", text_file, passes), "t.yaml"),
                           progress=False)
    streamed = run_recipe(parse_recipe(recipe_data(folder, tmp_path / "ooc", text_file, passes, max_memory="16GiB"),
                                       "t.yaml"), progress=False)
    assert in_memory.passed and streamed.passed, streamed.failures
    assert_same_weights(tmp_path / "mem", tmp_path / "ooc")
