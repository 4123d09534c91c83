"""The LoRA training loop (compress/training.py) and the lora_recover pass, on tiny random Llamas."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import passes.lora_recover.run  # noqa: F401  (registers the pass)
from compress.context import PassContext
from compress.run import apply_plan
from compress.plan import Plan
from compress.registry import get_pass
from compress.training import (
    LoRASpec,
    TrainSpec,
    apply_lora_factors,
    attach_lora,
    lora_modules,
    merge_lora,
    train_lora,
)
from conftest import tiny_model
from passes.lora_recover.run import block_ranks

TOKENS = torch.randint(0, 128, (3000,), generator=torch.Generator().manual_seed(1))
SPEC = LoRASpec(rank=4, alpha=8.0, dropout=0.1)


class ByteTokenizer:
    """A stand-in tokenizer for the 128-token tiny models: one id per UTF-8 byte, modulo 128."""

    def __call__(self, text, **kwargs):
        return {"input_ids": [b % 128 for b in text.encode("utf-8")]}


@pytest.fixture
def text_file(tmp_path):
    words = ["the", "pruned", "model", "learns", "again", "from", "a", "little", "text", "and", "recovers"]
    g = torch.Generator().manual_seed(0)
    picks = torch.randint(0, len(words), (1500,), generator=g).tolist()
    path = tmp_path / "train.txt"
    path.write_text(" ".join(words[i] for i in picks), encoding="utf-8")
    return path


def run_pass(model, name, tokenizer=None, **options):
    spec = get_pass(name)
    calibration = torch.randint(0, 128, (10, 16), generator=torch.Generator().manual_seed(0))
    ctx = PassContext(model=model, tokenizer=tokenizer, calibration_loader=lambda: calibration, batch_size=5,
                      progress=False, dense_loader=tiny_model)  # tiny_model() is what the tests prune
    return spec.cls(spec.options(**options)).run(ctx)


def recover_options(text_file, tmp_path, **overrides):
    options = dict(steps=4, lr=1e-2, rank=4, batch_size=2, seqlen=16, warmup_steps=2, source=str(text_file),
                   checkpoint_every=2, checkpoint_dir=str(tmp_path / "ckpt"))
    options.update(overrides)
    return options


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


# ----------------------------------------------------------------------------- training loop
def test_merged_model_matches_the_unmerged_peft_model():
    model = tiny_model()
    train_lora(model, TOKENS, SPEC, TrainSpec(steps=3, lr=1e-2, batch_size=2, seqlen=16), progress=False)
    assert lora_modules(model)  # still attached
    batch = TOKENS[:64].reshape(4, 16)
    model.eval()
    with torch.no_grad():
        unmerged = model(batch).logits
    factors = merge_lora(model)
    assert not lora_modules(model) and not hasattr(model, "peft_config")
    assert all(type(m) is torch.nn.Linear for n, m in model.named_modules() if n.endswith("_proj"))
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        merged = model(batch).logits
    assert (merged - unmerged).abs().max() < 1e-4
    assert any(factors[k].abs().max() > 0 for k in factors if k.endswith(".lora_B"))  # the adapters did move
    assert len([k for k in factors if k.endswith(".lora_A")]) == 4 * 7
    assert all(v.dtype == torch.float32 for v in factors.values())


def test_loss_goes_down_on_a_fixed_batch():
    model = tiny_model()
    stream = TOKENS[:17]  # seqlen + 1 tokens: every random window is the same one
    result = train_lora(model, stream, LoRASpec(rank=8, alpha=16.0), TrainSpec(steps=12, lr=1e-2, batch_size=2, seqlen=16),
                        progress=False)
    assert result.losses[-1] < result.losses[0] - 0.5, result.losses


def test_same_seed_gives_identical_weights_other_seed_does_not():
    train = TrainSpec(steps=3, lr=1e-2, batch_size=2, seqlen=16, grad_accum=2, warmup_steps=2, seed=3)
    models = [tiny_model(), tiny_model(), tiny_model()]
    for model, seed in zip(models, (3, 3, 4)):
        train_lora(model, TOKENS, SPEC, TrainSpec(**{**train.__dict__, "seed": seed}), progress=False)
        merge_lora(model)
    assert_same_weights(models[0], models[1])
    assert not torch.equal(models[0].model.layers[1].mlp.up_proj.weight, models[2].model.layers[1].mlp.up_proj.weight)


def test_interrupted_training_resumes_to_the_same_weights(tmp_path):
    train = TrainSpec(steps=6, lr=1e-2, batch_size=2, seqlen=16, grad_accum=2, warmup_steps=3, seed=0)
    reference = tiny_model()
    full = train_lora(reference, TOKENS, SPEC, train, progress=False)
    merge_lora(reference)

    class Interrupt(Exception):
        pass

    def stop_after_four(step, loss):
        if step == 4:
            raise Interrupt

    interrupted = tiny_model()
    with pytest.raises(Interrupt):
        train_lora(interrupted, TOKENS, SPEC, train, checkpoint_dir=tmp_path, checkpoint_every=3, progress=False,
                   callback=stop_after_four)
    assert not lora_modules(interrupted)  # an interrupted run leaves the model as it was
    assert (tmp_path / "checkpoint.pt").is_file() and not list(tmp_path.glob(".*tmp*"))

    resumed_model = tiny_model()
    resumed = train_lora(resumed_model, TOKENS, SPEC, train, checkpoint_dir=tmp_path, checkpoint_every=3, progress=False)
    merge_lora(resumed_model)
    assert resumed.resumed_from == 3
    assert resumed.losses == full.losses
    assert_same_weights(reference, resumed_model)

    # The finished run left its final checkpoint: a restart trains nothing and ends the same.
    again = tiny_model()
    assert train_lora(again, TOKENS, SPEC, train, checkpoint_dir=tmp_path, progress=False).resumed_from == 6
    merge_lora(again)
    assert_same_weights(reference, again)

    # Another run (other options) does not resume from that checkpoint.
    other = train_lora(tiny_model(), TOKENS, SPEC, TrainSpec(**{**train.__dict__, "lr": 5e-3}), checkpoint_dir=tmp_path,
                       progress=False)
    assert other.resumed_from == 0


def test_factors_reproduce_the_merge_and_mismatches_are_refused():
    model = tiny_model()
    train_lora(model, TOKENS, SPEC, TrainSpec(steps=2, lr=1e-2, batch_size=2, seqlen=16), progress=False)
    factors = merge_lora(model)
    replayed = tiny_model()
    apply_lora_factors(replayed, factors)
    assert_same_weights(model, replayed)

    from compress.errors import CompressError

    pruned = tiny_model(intermediate_size=48)
    with pytest.raises(CompressError, match="shapes"):
        apply_lora_factors(pruned, factors)
    attach_lora(model, SPEC, seed=0)
    with pytest.raises(CompressError, match="already has LoRA"):
        attach_lora(model, SPEC, seed=0)


# ----------------------------------------------------------------------------- the pass
def test_block_ranks_keep_the_mean_the_floor_and_the_order():
    ranks = block_ranks([0.1, 0.2, 0.3, 0.4], 8)
    assert sum(ranks) == 32 and ranks == sorted(ranks) and min(ranks) >= 1
    assert block_ranks([0.001, 0.5, 0.5, 3.0], 2) == [1, 1, 1, 5]
    assert block_ranks([0.0, 0.0, 0.0], 4) == [4, 4, 4]
    assert block_ranks([0.3, 0.1, 0.2], 1) == [1, 1, 1]


def test_rank_by_block_importance_follows_the_importance(text_file, tmp_path):
    model = tiny_model()
    step = run_pass(model, "lora_recover", ByteTokenizer(),
                    **recover_options(text_file, tmp_path, steps=2, rank=6, rank_by="block_importance"))
    ranks, importance = step.details["lora_ranks"], step.details["block_importance"]
    assert len(ranks) == len(importance) == 4
    assert sum(ranks) / len(ranks) == pytest.approx(6, abs=0.25) and min(ranks) >= 1
    order = sorted(range(4), key=lambda i: importance[i])
    assert [ranks[i] for i in order] == sorted(ranks)  # a more important block never gets a smaller rank
    assert len(set(ranks)) > 1
    factors = step.artifacts["lora_recover"]
    for layer, rank in enumerate(ranks):
        a = factors[f"model.layers.{layer}.self_attn.q_proj.lora_A"]
        assert a.shape[0] == rank
        assert float(factors[f"model.layers.{layer}.mlp.down_proj.scaling"]) == pytest.approx(16.0 / rank)  # alpha / r


def test_pass_plan_replays_on_the_pruned_untrained_model(text_file, tmp_path):
    model = tiny_model()
    steps = [run_pass(model, "flap", ratio=0.4)]
    pruned_only = tiny_model()
    apply_plan(pruned_only, Plan(model={"num_layers": 4}, steps=list(steps)))
    steps.append(run_pass(model, "lora_recover", ByteTokenizer(),
                          **recover_options(text_file, tmp_path, target_modules=["q_proj", "down_proj"])))
    step = steps[-1]
    assert step.layers == [] and step.options["steps"] == 4
    assert step.details["lora_ranks"] == [4, 4, 4, 4] and step.details["adapted_modules"] == 8
    assert not torch.equal(model.model.layers[1].mlp.down_proj.weight, pruned_only.model.layers[1].mlp.down_proj.weight)

    plan = Plan(model={"num_layers": 4}, steps=steps)
    written = plan.save(tmp_path / "plan.json")
    assert written == ["plan.json", "1-lora_recover.safetensors"]
    data = json.loads((tmp_path / "plan.json").read_text())
    assert data["steps"][1]["artifacts"] == {"lora_recover": "1-lora_recover.safetensors"}
    assert "artifacts" not in data["steps"][0]

    replayed = tiny_model()
    apply_plan(replayed, Plan.load(tmp_path / "plan.json"))
    assert_same_weights(model, replayed)

    from compress.errors import PlanError

    (tmp_path / "1-lora_recover.safetensors").unlink()
    with pytest.raises(PlanError, match="1-lora_recover.safetensors"):
        Plan.load(tmp_path / "plan.json")


def test_pass_resumes_from_its_default_checkpoint(text_file, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path / "cache"))
    options = recover_options(text_file, tmp_path, checkpoint_dir=None)
    first = tiny_model()
    step = run_pass(first, "lora_recover", ByteTokenizer(), **options)
    assert step.details["resumed_from_step"] == 0
    assert len(list((tmp_path / "cache" / "checkpoints").iterdir())) == 1
    second = tiny_model()
    again = run_pass(second, "lora_recover", ByteTokenizer(), **options)
    assert again.details["resumed_from_step"] == 4
    assert_same_weights(first, second)


def test_distillation_brings_the_pruned_model_closer_to_the_dense_one(text_file, tmp_path):
    """loss: kl (the default) trains towards the dense model's distributions: the KL to it on
    held-out windows falls, and further than next-token training on the same text does."""
    from compress.evaluation import compare_logits

    ids = torch.tensor(ByteTokenizer()(text_file.read_text(encoding="utf-8"))["input_ids"])
    held_out = ids[-6 * 16:].reshape(6, 16)  # windows of the same kind of text
    kls = {}
    for loss in ("kl", "next_token"):
        model = tiny_model()
        run_pass(model, "flap", ratio=0.5)
        before = compare_logits(tiny_model(), model, held_out).mean_kl
        run_pass(model, "lora_recover", ByteTokenizer(),
                 **recover_options(text_file, tmp_path / loss, steps=40, lr=1e-2, loss=loss, checkpoint_every=0))
        kls[loss] = compare_logits(tiny_model(), model, held_out).mean_kl
        assert before > 0.05
    assert kls["kl"] < 0.7 * before
    assert kls["kl"] < kls["next_token"]


def test_options_are_validated(text_file):
    from pydantic import ValidationError

    options = get_pass("lora_recover").options
    assert options().warmup() == 10 and options(steps=200, warmup_steps=0.05).warmup() == 10
    for bad in ({"warmup_steps": 2.5}, {"target_modules": ["lm_head"]}, {"source": "austen:nope"},
                {"source": "/no/such/file.txt"}, {"rank": 0}, {"rank_by": "size"}, {"target_modules": ["q_proj", "q_proj"]}):
        with pytest.raises(ValidationError):
            options(**bad)


def test_balance_needs_kl_and_a_mix():
    from pydantic import ValidationError

    options = get_pass("lora_recover").options
    with pytest.raises(ValidationError, match="balance .*needs loss: kl.*'next_token'"):
        options(balance=1.0, loss="next_token")
    with pytest.raises(ValidationError, match="balance needs a mixed training source.*'austen'"):
        options(balance=1.0, source="austen")
    assert options(balance=2.0).train_spec().balance == 2.0 and options().train_spec().balance == 0.0


def test_balanced_recovery_draws_the_general_mix_by_part_and_replays(tmp_path):
    """balance on the general mix: LoRA distillation trains on the mix's parts (their final draw
    weights in the details), block-importance ranks still read the whole mix, and the plan replays."""
    from compress.calibration.sources import general_mix_parts

    model = tiny_model()
    steps = [run_pass(model, "flap", ratio=0.5)]
    steps.append(run_pass(model, "lora_recover", ByteTokenizer(), steps=3, rank=2, batch_size=4, seqlen=16,
                          source="general", balance=1.0, rank_by="block_importance", importance_samples=4,
                          checkpoint_dir=str(tmp_path / "ckpt")))
    weights = steps[-1].details["part_weights"]
    assert list(weights) == list(general_mix_parts()) and sum(weights.values()) == pytest.approx(1.0, abs=1e-3)
    assert len(steps[-1].details["block_importance"]) == 4
    replayed = tiny_model()
    apply_plan(replayed, Plan(model={"num_layers": 4}, steps=steps))
    assert_same_weights(replayed, model)


def test_the_recover_recipe_validates():
    from compress.recipe import load_recipe

    recipe = load_recipe(Path(__file__).resolve().parent.parent / "recipes" / "llama-flap-50-recover.yaml")
    assert [e.name for e in recipe.passes] == ["flap", "lora_recover"]
    assert recipe.passes[1].options.steps == 200 and recipe.export.formats == ["safetensors"]


@pytest.mark.slow
def test_recipe_run_and_apply_reproduce_the_recovered_weights(tmp_path):
    """End to end: flap + lora_recover through run_recipe, then `compress apply` on the dense model."""
    from compress.run import run_recipe
    from conftest import assert_apply_reproduces, tiny_recipe

    folder, recipe = tiny_recipe(tmp_path, "tiny-recover", [
        {"flap": {"ratio": 0.4}},
        {"lora_recover": {"steps": 3, "batch_size": 2, "seqlen": 32, "lr": 1e-3, "source": "austen:persuasion",
                          "checkpoint_dir": str(tmp_path / "ckpt"), "rank_by": "block_importance"}}])
    first = run_recipe(recipe, progress=False)
    assert first.passed, first.failures
    assert (tmp_path / "a" / "1-lora_recover.safetensors").is_file()
    assert "1-lora_recover.safetensors" in first.report["artifacts"]["files"]
    assert first.report["passes"][1]["details"]["lora_ranks"]
    assert_apply_reproduces(tmp_path, folder)
    assert (tmp_path / "b" / "1-lora_recover.safetensors").is_file()
