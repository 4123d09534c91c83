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
from compress.training import (PART_FLOOR, PartSampler, TrainSpec, distillation_loss, distillation_terms, excess_nll, hidden_state_loss, train_weights,
                               training_loss)
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
    for bad in ({"rank": 8}, {"temperature": 0}, {"steps": 0}, {"source": "austen:nope"}, {"hidden_weight": -1},
                {"balance": -1}):
        with pytest.raises(ValidationError):
            options(**bad)
    with pytest.raises(ValidationError, match="balance needs a mixed training source.*'austen'"):
        options(balance=1.0, source="austen")
    assert options(balance=2.0).train_spec().balance == 2.0


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


PARTS = {"a": TOKENS[:1000], "b": TOKENS[1000:2000] + 128, "c": TOKENS[2000:] + 256}  # ids tell the part


def test_part_sampler_draws_uniformly_until_it_has_seen_every_part_then_by_excess():
    """Weights are uniform before any part's excess is known and at power 0; then the floor plus
    (1 - floor) times each part's share of excess^power, negative excess counting as 0."""
    sampler = PartSampler(PARTS, batch_size=6, seqlen=8, seed=0, power=1.0)
    assert sampler.weights() == pytest.approx([1 / 3] * 3)
    batch = sampler.next()
    assert batch.shape == (6, 8)
    for window, part in zip(batch, sampler.last):  # each window comes from the part it was drawn from
        assert int(window.min()) // 128 == int(window.max()) // 128 == part
    sampler.last = [0, 1, 2]
    sampler.observe(torch.tensor([0.2, 0.6, -0.3]))
    floor = PART_FLOOR / 3
    assert sampler.weights() == pytest.approx([floor + (1 - PART_FLOOR) * 0.25, floor + (1 - PART_FLOOR) * 0.75, floor])
    sampler.power = 2.0
    assert sampler.weights() == pytest.approx([floor + (1 - PART_FLOOR) * 0.1, floor + (1 - PART_FLOOR) * 0.9, floor])
    sampler.power = 0.0
    assert sampler.weights() == pytest.approx([1 / 3] * 3)


def test_part_sampler_forgets_old_excess_and_resumes_from_its_state():
    sampler = PartSampler(PARTS, batch_size=4, seqlen=8, seed=3, power=1.0)
    sampler.last = [0, 1, 2]
    sampler.observe(torch.tensor([1.0, 1.0, 1.0]))
    for _ in range(60):  # part 0 improves: its recent windows have no excess
        sampler.last = [0]
        sampler.observe(torch.tensor([0.0]))
    weights = sampler.weights()
    assert weights[0] < 0.2 < weights[1] == pytest.approx(weights[2])
    sampler.next()
    copy = PartSampler(PARTS, batch_size=4, seqlen=8, seed=99, power=1.0)
    copy.load_state_dict(sampler.state_dict())
    assert torch.equal(copy.next(), sampler.next()) and copy.last == sampler.last


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_distillation_terms_read_the_excess_from_the_kl_chunks(monkeypatch, temperature):
    """The loss is distillation_loss's and the excess excess_nll's, with chunks that split windows."""
    import compress.training as training

    monkeypatch.setattr(training, "DISTILL_CHUNK", 7)  # 3 windows of 16 positions: chunks cross windows
    dense, pruned = tiny_model(), tiny_model()
    run_pass(pruned, "flap", ratio=0.5)
    batch = TOKENS[:48].reshape(3, 16)
    with torch.no_grad():
        logits, teacher = pruned(input_ids=batch).logits, dense(input_ids=batch).logits
    loss, excess = distillation_terms(logits, teacher, temperature, batch)
    assert loss.item() == pytest.approx(distillation_loss(logits, teacher, temperature).item(), rel=1e-6)
    assert torch.allclose(excess, excess_nll(logits, teacher, batch), atol=1e-5)
    assert excess.dtype == torch.float64 and not excess.requires_grad
    assert distillation_terms(logits, teacher, temperature)[1] is None


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_chunked_kl_gradient_is_autograds(monkeypatch, temperature):
    """The gradient the chunked KL saves equals autograd's through the plain formula, in the logits' dtype."""
    import torch.nn.functional as F

    import compress.training as training

    monkeypatch.setattr(training, "DISTILL_CHUNK", 4)
    teacher = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(1))
    logits = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(0), requires_grad=True)
    (3 * distillation_loss(logits, teacher, temperature)).backward()
    mine, logits.grad = logits.grad, None
    q = F.softmax(teacher / temperature, -1)
    reference = temperature**2 * (q * (q.log() - F.log_softmax(logits / temperature, -1))).sum(-1).mean()
    (3 * reference).backward()
    assert torch.allclose(mine, logits.grad, atol=1e-6)
    low = logits.detach().bfloat16().requires_grad_()
    distillation_loss(low, teacher, temperature).backward()
    assert low.grad.dtype == torch.bfloat16 and torch.allclose(low.grad.float(), logits.grad / 3, atol=1e-3)


def test_excess_nll_is_the_log_ppl_ratio_of_each_window():
    dense, pruned = tiny_model(), tiny_model()
    run_pass(pruned, "flap", ratio=0.5)
    batch = TOKENS[:48].reshape(3, 16)
    with torch.no_grad():
        excess = excess_nll(pruned(input_ids=batch).logits, dense(input_ids=batch).logits, batch)
        for window, value in zip(batch, excess):
            row = window[None]
            expected = pruned(input_ids=row, labels=row).loss - dense(input_ids=row, labels=row).loss
            assert value.item() == pytest.approx(expected.item(), abs=1e-5)
    assert excess.dtype == torch.float64 and excess.shape == (3,)


def test_balance_is_refused_without_kl_or_without_a_mix():
    with pytest.raises(CompressError, match="balance needs loss: kl"):
        TrainSpec(balance=1.0)
    with pytest.raises(CompressError, match=">= 0"):
        TrainSpec(loss="kl", balance=-1.0)
    with pytest.raises(CompressError, match="mixed text source"):
        train_weights(tiny_model(), TOKENS, ["model.layers.0.mlp.up_proj.weight"],
                      TrainSpec(steps=1, loss="kl", balance=1.0), progress=False, teacher=tiny_model())


def test_balanced_training_reweights_the_parts_toward_the_worst_one(text_file):  # noqa: F811
    """Each window's excess goes to the part it was drawn from: the part where the student is further
    from the teacher (measured beforehand on 16 windows of each) ends with the larger weight."""
    from compress.calibration.sources import random_windows

    parts = {"random": TOKENS, "text": torch.tensor(ByteTokenizer()(text_file.read_text())["input_ids"])}
    dense, pruned = tiny_model(), tiny_model()  # the teacher learns the text, so the student lags there
    train_weights(dense, parts["text"], [n for n, _ in dense.named_parameters()],
                  TrainSpec(steps=30, lr=1e-2, batch_size=4, seqlen=16), progress=False)
    run_pass(pruned, "flap", ratio=0.5)
    with torch.no_grad():
        gap = {}
        for name, ids in parts.items():
            windows = random_windows(ids, 16, 16, seed=5)
            gap[name] = excess_nll(pruned(input_ids=windows).logits, dense(input_ids=windows).logits, windows).mean()
    worst, best = sorted(gap, key=gap.get, reverse=True)
    assert gap[worst] > 2 * max(gap[best], 0.0) and gap[worst] > 0.05
    result = train_weights(pruned, parts, ["model.layers.0.mlp.up_proj.weight"],
                           TrainSpec(steps=8, lr=1e-6, batch_size=4, seqlen=16, loss="kl", balance=1.0),
                           progress=False, teacher=dense)
    weights = result.part_weights
    assert list(weights) == ["random", "text"] and sum(weights.values()) == pytest.approx(1.0, abs=1e-3)
    assert weights[worst] > 0.6 and result.summary()["part_weights"] == weights


def test_distill_with_balance_draws_the_general_mix_by_part_and_replays(tmp_path):
    """On the general mix, the pass trains on the mix's parts (one weight per part in the details),
    and its plan reproduces the weights."""
    from compress.calibration.sources import general_mix_parts

    model = tiny_model()
    steps = [run_pass(model, "flap", ratio=0.5)]
    steps.append(run_pass(model, "distill", ByteTokenizer(), steps=3, batch_size=4, seqlen=16, source="general",
                          balance=1.0, checkpoint_dir=str(tmp_path / "ckpt")))
    assert list(steps[-1].details["part_weights"]) == list(general_mix_parts())
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
