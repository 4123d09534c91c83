"""LoRAPrune: schedule, importance estimators, masks, slicing, resume and replay, on tiny random decoders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import passes.loraprune.run  # noqa: F401  (registers the pass)
from compress.context import PassContext
from compress.models.adapters import get_adapter
from compress.run import apply_plan
from compress.plan import Plan
from compress.pruning.lora_importance import (
    LoraGradientScorer,
    TaylorScorer,
    UnitImportance,
    lora_element_importance,
)
from compress.pruning.masks import UnitMasks
from compress.pruning.schedule import PruningSchedule, cubic_sparsity
from compress.registry import get_pass
from compress.training import LoRASpec, attach_lora, detach_lora, lora_modules
from conftest import tiny_model
from passes.loraprune.run import default_skip_layers, rank_correlation
from test_lora_recover import ByteTokenizer, assert_same_weights

BATCH = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(3))


@pytest.fixture
def text_file(tmp_path):
    words = ["the", "pruned", "model", "learns", "again", "from", "a", "little", "text", "and", "recovers"]
    picks = torch.randint(0, len(words), (1500,), generator=torch.Generator().manual_seed(0)).tolist()
    path = tmp_path / "train.txt"
    path.write_text(" ".join(words[i] for i in picks), encoding="utf-8")
    return path


def options(text_file, tmp_path, **overrides):
    values = dict(ratio=0.5, steps=12, prune_every=2, batch_size=2, seqlen=16, lr=1e-2, rank=4, warmup_steps=2,
                  source=str(text_file), skip_layers=[0], checkpoint_every=3, checkpoint_dir=str(tmp_path / "ckpt"))
    values.update(overrides)
    return get_pass("loraprune").options(**values)


def linear_params(model) -> int:
    """Weights and biases of every decoder layer's attention and MLP."""
    adapter = get_adapter(model)
    return sum(p.numel() for i in range(adapter.num_layers) for part in (adapter.attention(i), adapter.mlp(i))
               for p in part.parameters())


def context(model):
    return PassContext(model=model, tokenizer=ByteTokenizer(), progress=False)


# ------------------------------------------------------------------------------------ schedule
def test_cubic_schedule_is_flat_at_both_ends_and_cubic_between():
    assert cubic_sparsity(10, 100, 0.5) == 0.0  # warm-up: step <= 10
    assert cubic_sparsity(91, 100, 0.5) == 0.5  # cool-down: step > 90
    assert cubic_sparsity(50, 100, 0.5) == pytest.approx(0.5 - 0.5 * (1 - 40 / 80) ** 3)
    ramp = [cubic_sparsity(s, 100, 0.5) for s in range(1, 101)]
    assert all(a <= b for a, b in zip(ramp, ramp[1:]))


def test_schedule_updates_on_the_ramp_and_reaches_the_target_once():
    schedule = PruningSchedule(total=200, final=0.5, every=10)
    steps = schedule.update_steps()
    assert steps[0] == 30 and steps[-1] == schedule.final_step() == 180
    assert all(s % 10 == 0 for s in steps)
    assert [schedule.ratio(s) for s in steps][-1] == 0.5
    # The reference stops below the target (its last update needs r < rf); ours ends on it.
    short = PruningSchedule(total=7, final=0.3, every=5, warmup=0.0, cooldown=0.0)
    assert short.update_steps() == [5, 7] and short.ratio(7) == 0.3


def test_default_skip_layers_are_the_first_tenth_and_the_last():
    assert default_skip_layers(32) == [0, 1, 2, 31]
    assert default_skip_layers(30) == [0, 1, 2, 29]
    assert default_skip_layers(4) == [3]


# ------------------------------------------------------------------------------------ importance
def _loss(model, batch=BATCH):
    return model(input_ids=batch, labels=batch, use_cache=False).loss


def test_lora_importance_is_the_papers_formula_and_sketches_the_weight_gradient():
    model = tiny_model()
    attach_lora(model, LoRASpec(rank=4, alpha=8.0), seed=0)
    layer = lora_modules(model)["model.layers.1.mlp.up_proj"]
    with torch.no_grad():  # a non-zero B, so every term of G_BA is exercised
        layer.lora_B["default"].weight.normal_(0, 0.1)
    _loss(model).backward()
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    s = layer.scaling["default"]
    da, db = a.grad, b.grad
    w_eff = layer.get_base_layer().weight + s * b @ a
    expected = ((db @ a + b @ da - db @ da) * w_eff).abs()
    torch.testing.assert_close(lora_element_importance(layer), expected.detach())

    # With G = dL/dW_eff: dL/dB = s·G·Aᵀ and dL/dA = s·Bᵀ·G (the card's derivation); G from the
    # gradient of the effective weight, computed with the adapters folded into a plain linear.
    dense = tiny_model()
    with torch.no_grad():
        dense.model.layers[1].mlp.up_proj.weight.copy_(w_eff)
    dense.model.layers[1].mlp.up_proj.weight.requires_grad_(True)
    _loss(dense).backward()
    g = dense.model.layers[1].mlp.up_proj.weight.grad
    torch.testing.assert_close(db, s * g @ a.detach().T, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(da, s * b.detach().T @ g, rtol=1e-4, atol=1e-6)


def test_exact_taylor_scores_equal_the_weight_gradient_contraction():
    """Σ_t y·dL/dy per row and Σ_t x·dL/dx per column equal Σ W ⊙ dL/dW over that row / column."""
    model = tiny_model()
    for p in model.parameters():
        p.requires_grad_(True)
    adapter = get_adapter(model)
    scorer = TaylorScorer()
    scorer.attach(adapter)
    _loss(model).backward()
    scores = scorer.collect()
    scorer.detach()
    d = adapter.head_dim
    for i in (0, 2):
        attn, mlp = adapter.attention(i), adapter.mlp(i)
        q = (attn.q_proj.weight * attn.q_proj.weight.grad).sum(1).reshape(-1, d).sum(1).abs()
        o = (attn.o_proj.weight * attn.o_proj.weight.grad).sum(0).reshape(-1, d).sum(1).abs()
        k = (attn.k_proj.weight * attn.k_proj.weight.grad).sum(1).reshape(-1, d).sum(1).abs()
        up = (mlp.up_proj.weight * mlp.up_proj.weight.grad).sum(1).abs()
        down = (mlp.down_proj.weight * mlp.down_proj.weight.grad).sum(0).abs()
        for role, expected in (("q_proj", q), ("o_proj", o), ("k_proj", k), ("up_proj", up), ("down_proj", down)):
            torch.testing.assert_close(scores[i][role], expected.double(), rtol=1e-4, atol=1e-7, msg=role)
    assert all(not s for s in scorer.sums)  # collect() resets the sums


def test_lora_scorer_reads_every_adapted_linear_and_skips_the_others():
    model = tiny_model()
    attach_lora(model, LoRASpec(target_modules=("q_proj", "up_proj"), rank=4), seed=0)
    scorer = LoraGradientScorer()
    scorer.attach(get_adapter(model))
    assert all(s == {} for s in scorer.collect())  # no gradient yet
    _loss(model).backward()
    scores = scorer.collect()
    assert set(scores[0]) == {"q_proj", "up_proj"}
    assert scores[0]["q_proj"].shape == (8,) and scores[0]["up_proj"].shape == (96,)
    detach_lora(model)


def test_importance_normalises_sums_per_parent_and_averages():
    adapter = get_adapter(tiny_model())  # 8 query heads over 4 KV heads: g = 2
    importance = UnitImportance(adapter, decay=0.9)
    q = torch.arange(1.0, 9.0, dtype=torch.float64)
    k = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    up = torch.ones(96, dtype=torch.float64)
    step = [{"q_proj": q, "k_proj": k, "up_proj": up}] + [{} for _ in range(3)]
    assert importance.update(step)
    expected_heads = q / q.norm() + torch.tensor([0.5, 0.5, 0, 0, 0, 0, 0, 0], dtype=torch.float64)
    torch.testing.assert_close(importance.heads[0], 0.1 * expected_heads)
    torch.testing.assert_close(importance.channels[0], 0.1 * up / up.norm())
    assert importance.update(step)
    torch.testing.assert_close(importance.heads[0], (0.09 + 0.1) * expected_heads)
    nan_step = [{"q_proj": torch.full((8,), float("nan"), dtype=torch.float64)}] + [{} for _ in range(3)]
    assert not importance.update(nan_step)
    assert importance.skipped == 1 and importance.updates == 2
    torch.testing.assert_close(importance.heads[0], 0.19 * expected_heads)


def test_rank_correlation():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert rank_correlation(a, a) == pytest.approx(1.0)
    assert rank_correlation(a, -a) == pytest.approx(-1.0)


# ------------------------------------------------------------------------------------ masks
def test_masks_zero_exactly_what_slicing_removes():
    model = tiny_model("qwen2")  # biased q/k/v
    adapter = get_adapter(model)
    masks = UnitMasks(adapter)
    masks.keep_heads[1][[2, 3]] = False  # KV head 1 entirely
    masks.keep_channels[2][::3] = False
    masks.attach(adapter)
    with torch.no_grad():
        masked = model(BATCH).logits
    masks.detach()
    plans = masks.layer_plans(adapter, "kv_groups")
    assert plans[1].keep_kv_heads == [0, 2, 3] and plans[1].keep_heads == [0, 1, 4, 5, 6, 7]
    assert plans[0].keep_heads is None and plans[2].keep_channels == [c for c in range(96) if c % 3]
    removed = masks.removed_params(adapter, "kv_groups")  # unit costs count the q/k/v biases too
    before = linear_params(model)
    from compress.pruning.surgeon import apply_layer_plan

    for plan in plans:
        apply_layer_plan(adapter, plan)
    assert before - linear_params(model) == removed
    with torch.no_grad():
        torch.testing.assert_close(model(BATCH).logits, masked, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------ the pass
@pytest.mark.parametrize("importance,gqa,allocator", [
    ("lora", "kv_groups", "uniform"),
    ("exact", "query_heads", "uniform"),
    ("lora", "query_heads", "global"),
])
def test_masks_follow_the_schedule_and_the_sliced_model_equals_the_masked_one(text_file, tmp_path, importance, gqa,
                                                                              allocator):
    model = tiny_model("qwen2")
    prune = get_pass("loraprune").cls(options(text_file, tmp_path, importance=importance, gqa=gqa, allocator=allocator))
    ctx = context(model)
    hooks, result = prune.train(ctx)

    schedule = PruningSchedule(total=12, final=0.5, every=2)
    assert [h["step"] for h in hooks.history] == schedule.update_steps()
    assert [h["target"] for h in hooks.history] == [round(schedule.ratio(s), 6) for s in schedule.update_steps()]
    removed = [h["removed"] for h in hooks.history]
    unit = max(get_adapter(model).kv_group_cost(1), 1) / get_adapter(model).decoder_linear_params()
    for h in hooks.history:  # each update lands within one attention unit of its target
        assert abs(h["removed"] - h["target"]) <= unit
    assert removed[-1] == pytest.approx(0.5, abs=0.01)
    assert hooks.importance.updates == 12
    assert all(bool(m.all()) for m in hooks.masks.keep_heads[:1] + hooks.masks.keep_channels[:1])  # skipped layer

    model.eval()
    with torch.no_grad():
        masked = model(BATCH).logits
    plans, factors = prune.finish(ctx, hooks)
    assert not lora_modules(model)
    with torch.no_grad():
        sliced = model(BATCH).logits
    assert float((sliced - masked).abs().max()) < 1e-4
    adapter = get_adapter(model)
    assert adapter.widths(0).heads == 8 and adapter.widths(1).intermediate < 96
    assert 1 - linear_params(model) / linear_params(tiny_model("qwen2")) == pytest.approx(removed[-1])


def test_resume_after_interruption_reproduces_the_uninterrupted_run(text_file, tmp_path):
    reference = tiny_model()
    full = get_pass("loraprune").cls(options(text_file, tmp_path, checkpoint_dir=str(tmp_path / "a"))).run(
        context(reference))

    class Interrupt(Exception):
        pass

    prune = get_pass("loraprune").cls(options(text_file, tmp_path, checkpoint_dir=str(tmp_path / "b")))
    interrupted = tiny_model()
    original = passes.loraprune.run.LoraPruneHooks.on_step_end

    def stop_at_seven(self, model, step, loss):
        original(self, model, step, loss)
        if step == 7:
            raise Interrupt

    passes.loraprune.run.LoraPruneHooks.on_step_end = stop_at_seven
    try:
        with pytest.raises(Interrupt):
            prune.run(context(interrupted))
    finally:
        passes.loraprune.run.LoraPruneHooks.on_step_end = original
    assert not lora_modules(interrupted)
    assert all(not m._forward_pre_hooks for m in interrupted.modules())  # masks removed with the adapters

    resumed_model = tiny_model()
    resumed = prune.run(context(resumed_model))
    assert resumed.details["resumed_from_step"] == 6  # checkpoints every 3 steps
    assert resumed.details["mask_updates"] == full.details["mask_updates"]
    assert resumed.layers == full.layers
    assert_same_weights(reference, resumed_model)


def test_plan_replays_bit_for_bit_on_the_dense_model(text_file, tmp_path):
    model = tiny_model()
    step = get_pass("loraprune").cls(options(text_file, tmp_path, gqa="query_heads")).run(context(model))
    assert step.details["removed_fraction"] == pytest.approx(0.5, abs=0.01)
    plan = Plan(model={"num_layers": 4}, steps=[step])
    assert plan.save(tmp_path / "plan.json") == ["plan.json", "0-lora.safetensors"]
    data = json.loads((tmp_path / "plan.json").read_text())
    assert data["steps"][0]["artifacts"] == {"lora": "0-lora.safetensors"}
    replayed = tiny_model()
    apply_plan(replayed, Plan.load(tmp_path / "plan.json"))
    assert_same_weights(model, replayed)


def test_bad_options_are_refused(text_file, tmp_path):
    from pydantic import ValidationError

    from compress.errors import CompressError

    Options = get_pass("loraprune").options
    for bad in ({"ratio": 1.0}, {"importance": "grad"}, {"allocator": "block_budget"}, {"prune_every": 0},
                {"prune_warmup": 1.0}, {"ema": 1.0}):
        with pytest.raises(ValidationError):
            Options(**{"ratio": 0.5, **bad})
    with pytest.raises(CompressError, match="prune_warmup"):
        get_pass("loraprune").cls(options(text_file, tmp_path, prune_warmup=0.6, prune_cooldown=0.5)).run(
            context(tiny_model()))
    with pytest.raises(CompressError, match="skip_layers"):
        get_pass("loraprune").cls(options(text_file, tmp_path, skip_layers=[9])).run(context(tiny_model()))
    with pytest.raises(CompressError, match="empty the other layers"):
        get_pass("loraprune").cls(options(text_file, tmp_path, ratio=0.9, skip_layers=[0, 1, 2])).run(
            context(tiny_model()))


def test_the_loraprune_recipe_validates():
    from compress.recipe import load_recipe

    recipe = load_recipe(Path(__file__).resolve().parent.parent / "recipes" / "llama-loraprune-50.yaml")
    assert [e.name for e in recipe.passes] == ["loraprune"]
    assert recipe.passes[0].options.ratio == 0.5 and recipe.passes[0].options.importance == "exact"


@pytest.mark.slow
def test_recipe_run_reloads_and_apply_reproduces_the_artifact(tmp_path):
    """End to end: loraprune through run_recipe (reload gate), then `compress apply` on the dense model."""
    from transformers import AutoModelForCausalLM

    from compress.run import run_recipe
    from conftest import assert_apply_reproduces, tiny_recipe

    folder, recipe = tiny_recipe(tmp_path, "tiny-loraprune", [
        {"loraprune": {"ratio": 0.4, "steps": 6, "prune_every": 2, "batch_size": 2, "seqlen": 32, "lr": 1e-3,
                       "source": "austen:persuasion", "skip_layers": [0], "checkpoint_dir": str(tmp_path / "ckpt")}}],
        calibration=False)
    first = run_recipe(recipe, progress=False)
    assert first.passed, first.failures
    assert (tmp_path / "a" / "0-lora.safetensors").is_file()
    details = first.report["passes"][0]["details"]
    assert details["removed_fraction"] == pytest.approx(0.4, abs=0.02)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "a", trust_remote_code=True)
    assert 1 - linear_params(reloaded) / linear_params(tiny_model()) == pytest.approx(details["removed_fraction"])
    assert_apply_reproduces(tmp_path, folder)


def test_taylor_hooks_do_not_keep_activations_alive():
    """The row hooks must not form a reference cycle with the output tensor: with the garbage
    collector off, a step's activations are freed as soon as backward is done."""
    import gc
    import weakref

    model = tiny_model()
    for p in model.parameters():
        p.requires_grad_(True)
    scorer = TaylorScorer()
    scorer.attach(get_adapter(model))
    seen = []
    handle = model.model.layers[1].mlp.up_proj.register_forward_hook(lambda m, a, out: seen.append(weakref.ref(out)))
    gc.disable()
    try:
        loss = _loss(model)
        loss.backward()
        del loss
        assert seen and seen[0]() is None
    finally:
        gc.enable()
        handle.remove()
        scorer.detach()
