"""The distill pass (full fine-tuning toward the dense model) and train_weights, on tiny random Llamas."""

from __future__ import annotations

import pytest
import torch
from test_lora_recover import ByteTokenizer, assert_same_weights, run_pass, text_file  # noqa: F401  (fixture)

import passes.distill.run  # noqa: F401  (registers the pass)
from compress.errors import CompressError
from compress.evaluation import compare_logits
from compress.plan import Plan
from compress.registry import get_pass
from compress.run import apply_plan
from compress.training import TrainSpec, hidden_state_loss, train_weights, training_loss
from conftest import tiny_model

TOKENS = torch.randint(0, 128, (3000,), generator=torch.Generator().manual_seed(1))


def distill_options(text_file, tmp_path, **overrides):
    options = dict(steps=4, lr=1e-3, batch_size=2, seqlen=16, warmup_steps=2, source=str(text_file),
                   checkpoint_every=2, checkpoint_dir=str(tmp_path / "ckpt"))
    options.update(overrides)
    return options


def test_train_weights_trains_only_the_named_parameters_and_restores_the_flags():
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    chosen = ["model.layers.1.mlp.down_proj.weight", "model.layers.2.input_layernorm.weight"]
    result = train_weights(model, TOKENS, chosen, TrainSpec(steps=3, lr=1e-2, batch_size=2, seqlen=16), progress=False)
    assert result.modules == sorted(chosen) and result.trainable_params == sum(before[n].numel() for n in chosen)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) != (name in chosen), name
        assert p.requires_grad
    assert model.training is False


def test_train_weights_refuses_half_precision_and_unknown_names():
    with pytest.raises(CompressError, match="float32"):
        train_weights(tiny_model().to(torch.bfloat16), TOKENS, ["model.layers.0.mlp.up_proj.weight"],
                      TrainSpec(steps=1), progress=False)
    with pytest.raises(CompressError, match="no parameter"):
        train_weights(tiny_model(), TOKENS, ["model.layers.9.nope"], TrainSpec(steps=1), progress=False)


def test_distill_brings_the_pruned_model_closer_and_its_plan_replays(text_file, tmp_path):  # noqa: F811
    """The KL to the dense model on held-out windows of the training text falls; the embedding and
    head stay as they were; the plan's saved weights reproduce the model on the pruned one."""
    ids = torch.tensor(ByteTokenizer()(text_file.read_text(encoding="utf-8"))["input_ids"])
    held_out = ids[-6 * 16:].reshape(6, 16)
    model = tiny_model()
    steps = [run_pass(model, "flap", ratio=0.5)]
    before = compare_logits(tiny_model(), model, held_out).mean_kl
    embedding = model.model.embed_tokens.weight.detach().clone()
    steps.append(run_pass(model, "distill", ByteTokenizer(), **distill_options(text_file, tmp_path, steps=30)))
    after = compare_logits(tiny_model(), model, held_out).mean_kl
    assert before > 0.05 and after < 0.7 * before
    assert torch.equal(model.model.embed_tokens.weight, embedding)
    step = steps[-1]
    assert step.layers == [] and step.details["resumed_from_step"] == 0
    assert all(name.startswith("model.layers.") for name in step.artifacts["distill"])

    plan = Plan(model={"num_layers": 4}, steps=steps)
    assert plan.save(tmp_path / "plan.json") == ["plan.json", "1-distill.safetensors"]
    replayed = tiny_model()
    apply_plan(replayed, Plan.load(tmp_path / "plan.json"))
    assert_same_weights(model, replayed)

    again = tiny_model()
    run_pass(again, "flap", ratio=0.5)
    resumed = run_pass(again, "distill", ByteTokenizer(), **distill_options(text_file, tmp_path, steps=30))
    assert resumed.details["resumed_from_step"] == 30
    assert_same_weights(model, again)


def test_distill_replay_refuses_a_mismatched_plan(text_file, tmp_path):  # noqa: F811
    from compress.errors import PlanError

    model = tiny_model()
    step = run_pass(model, "distill", ByteTokenizer(), **distill_options(text_file, tmp_path, steps=1))
    pruned = tiny_model()
    run_pass(pruned, "flap", ratio=0.5)
    with pytest.raises(PlanError, match="distill step's"):
        apply_plan(pruned, Plan(model={"num_layers": 4}, steps=[step]))


def test_distill_options_are_validated():
    from pydantic import ValidationError

    options = get_pass("distill").options
    assert options().batch_size == 8 and options().warmup() == 10
    for bad in ({"rank": 8}, {"temperature": 0}, {"steps": 0}, {"source": "austen:nope"}, {"hidden_weight": -1}):
        with pytest.raises(ValidationError):
            options(**bad)


def test_hidden_state_loss_is_the_mean_relative_distance_of_the_block_outputs():
    """Zero for equal states; the embeddings (entry 0) do not count; each position weighs the same
    whatever its norm: a tenfold error on a tenfold larger state adds the same as a unit one."""
    g = torch.Generator().manual_seed(0)
    teacher = tuple(torch.randn(2, 5, 8, generator=g) for _ in range(3))
    assert hidden_state_loss(teacher, teacher).item() == 0.0
    shifted = (teacher[0] + 1.0, *teacher[1:])
    assert hidden_state_loss(shifted, teacher).item() == 0.0
    unit = torch.zeros(1, 2, 4)
    unit[..., 0] = 1.0
    big = unit * 10
    student = (unit, unit + torch.tensor([0.0, 0.5, 0.0, 0.0]), big + torch.tensor([0.0, 5.0, 0.0, 0.0]))
    assert hidden_state_loss(student, (unit, unit, big)).item() == pytest.approx(0.25)
    with pytest.raises(CompressError, match="hidden states"):
        hidden_state_loss(teacher[:2], teacher)


def test_hidden_weight_adds_the_hidden_term_to_the_kl_and_needs_it():
    """loss kl with hidden_weight w is the KL plus w times the hidden-state distance (and 0 adds
    nothing); it is refused for next-token loss and when negative."""
    dense, pruned = tiny_model(), tiny_model()
    run_pass(pruned, "flap", ratio=0.5)
    batch = TOKENS[:32].reshape(2, 16)
    kl = training_loss(pruned, batch, TrainSpec(loss="kl"), dense)
    with torch.no_grad():
        hid = hidden_state_loss(pruned(input_ids=batch, output_hidden_states=True).hidden_states,
                                dense(input_ids=batch, output_hidden_states=True).hidden_states)
    assert hid.item() > 0.01
    both = training_loss(pruned, batch, TrainSpec(loss="kl", hidden_weight=3.0), dense)
    assert both.item() == pytest.approx(kl.item() + 3.0 * hid.item(), rel=1e-5)
    with pytest.raises(CompressError, match="needs loss: kl"):
        TrainSpec(hidden_weight=1.0)
    with pytest.raises(CompressError, match=">= 0"):
        TrainSpec(loss="kl", hidden_weight=-0.5)


def test_distill_with_the_hidden_term_trains_and_replays(text_file, tmp_path):  # noqa: F811
    """The pass passes hidden_weight to the training (the loss differs from the logits-only run) and
    its plan still reproduces the weights."""
    runs = {}
    for weight in (0.0, 2.0):
        model = tiny_model()
        steps = [run_pass(model, "flap", ratio=0.5)]
        steps.append(run_pass(model, "distill", ByteTokenizer(), **distill_options(
            text_file, tmp_path, steps=3, hidden_weight=weight, checkpoint_dir=str(tmp_path / f"ckpt{weight}"))))
        runs[weight] = (model, steps)
    assert runs[2.0][1][-1].details["loss_first_steps"] > runs[0.0][1][-1].details["loss_first_steps"]
    model, steps = runs[2.0]
    replayed = tiny_model()
    apply_plan(replayed, Plan(model={"num_layers": 4}, steps=steps))
    assert_same_weights(replayed, model)


@pytest.mark.slow
def test_recipe_run_and_apply_reproduce_the_distilled_weights(tmp_path):
    """End to end: flap with the shipped recipe's least squares (dense_output target) + distill through
    run_recipe, then `compress apply` on the dense model writes the same safetensors."""
    from compress.run import run_recipe
    from conftest import assert_apply_reproduces, tiny_recipe

    folder, recipe = tiny_recipe(tmp_path, "tiny-distill", [
        {"flap": {"ratio": 0.4, "allocator": "uniform", "compensation": "least_squares", "ls_prior": "dense",
                  "ls_damp": "auto", "sequential": True, "ls_target": "dense_output"}},
        {"distill": {"steps": 3, "batch_size": 2, "seqlen": 32, "lr": 1e-3, "lr_schedule": "cosine",
                     "source": "austen:persuasion", "checkpoint_dir": str(tmp_path / "ckpt")}}])
    first = run_recipe(recipe, progress=False)
    assert first.passed, first.failures
    assert "1-distill.safetensors" in first.report["artifacts"]["files"]
    assert any(k.endswith(".drift") for k in first.report["passes"][0]["details"]["ls_damp_chosen"])
    assert_apply_reproduces(tmp_path, folder)
