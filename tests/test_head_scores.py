"""Head / channel gates and importance scores on tiny random BERT, ViT and CLIP-vision encoders."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertModel, CLIPVisionConfig, CLIPVisionModel, ViTConfig, ViTModel

from compress.errors import CompressError
from compress.models.encoder import EncoderAdapter
from compress.plan import LayerPlan, PlanStep
from compress.pruning.encoder_surgeon import apply_encoder_step
from compress.pruning.head_gates import ChannelGates, HeadGates
from compress.pruning.head_scores import (
    CHANNEL_SCORES,
    HEAD_SCORES,
    AblationScore,
    ChannelOutputNormScore,
    ChannelWeightNormScore,
    OutputNormScore,
    TaylorGateScore,
    UsageTop1Score,
    WeightNormScore,
    example_top1_heads,
    example_usage_top1,
    head_contribution_stats,
    normalise_michel,
)

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ("bert", "vit", "clip")
HEADS, HEAD_DIM, LAYERS, INTERMEDIATE = 4, 8, 2, 64


def tiny_encoder(family: str, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=INTERMEDIATE)
    if family == "bert":
        model = BertModel(BertConfig(vocab_size=100, max_position_embeddings=64, **common), add_pooling_layer=False)
    elif family == "vit":
        model = ViTModel(ViTConfig(image_size=32, patch_size=8, **common), add_pooling_layer=False)
    else:
        model = CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=8, **common))
    with torch.no_grad():  # random init is near-uniform; widen it so heads differ
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model.eval()


def tiny_batches(family: str, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    if family == "bert":
        batches = []
        for lengths in ((10, 7, 4), (9, 10, 6)):
            ids = torch.randint(1, 100, (3, 10), generator=g)
            mask = (torch.arange(10)[None, :] < torch.tensor(lengths)[:, None]).long()
            batches.append({"input_ids": ids * mask, "attention_mask": mask,
                            "token_type_ids": torch.zeros_like(ids)})
        return batches
    return [{"pixel_values": torch.randn(3, 3, 32, 32, generator=g)} for _ in range(2)]


def counted_tokens(batches, family) -> int:
    if family == "bert":
        return sum(int(b["attention_mask"].sum()) for b in batches)
    return sum(b["pixel_values"].shape[0] * 17 for b in batches)  # 16 patches + CLS


def run(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).last_hidden_state


def o_inputs(adapter, batches) -> list[list[torch.Tensor]]:
    """Per layer, per batch: the o linear's input [B, T, H·D] (independent capture)."""
    captured = [[] for _ in range(adapter.num_layers)]
    handles = [adapter.attention_consumer(i).register_forward_pre_hook(
        lambda module, args, i=i: captured[i].append(args[0].detach().clone())) for i in range(adapter.num_layers)]
    for batch in batches:
        run(adapter.model, batch)
    for handle in handles:
        handle.remove()
    return captured


def mask_of(batch, x) -> torch.Tensor:
    return batch["attention_mask"].bool() if "attention_mask" in batch else torch.ones(x.shape[:2], dtype=torch.bool)


# ------------------------------------------------------------------------------------ gates
@pytest.mark.parametrize("family", FAMILIES)
def test_gates_at_ones_change_nothing(family):
    model = tiny_encoder(family)
    batch = tiny_batches(family)[0]
    reference = run(model, batch)
    adapter = EncoderAdapter(model)
    with HeadGates(adapter) as heads, ChannelGates(adapter) as channels:
        assert [g.shape[0] for g in heads.gates] == [HEADS] * LAYERS
        assert [g.shape[0] for g in channels.gates] == [INTERMEDIATE] * LAYERS
        assert torch.equal(run(model, batch), reference)
    assert torch.equal(run(model, batch), reference)  # hooks removed


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("keep", [{0: [0, 2], 1: [3]}, {0: [1, 2, 3], 1: []}])
def test_head_mask_equals_slicing(family, keep):
    model = tiny_encoder(family)
    batch = tiny_batches(family)[0]
    adapter = EncoderAdapter(model)
    with HeadGates(adapter) as gates:
        gates.set_masks(keep)
        masked = run(model, batch)
    sliced = copy.deepcopy(model)
    apply_encoder_step(EncoderAdapter(sliced), PlanStep("head_prune", {}, [LayerPlan(i, keep_heads=k) for i, k in keep.items()]))
    assert (masked - run(sliced, batch)).abs().max() < 1e-5
    assert not (masked - run(model, batch)).abs().max() < 1e-3  # the mask does something


@pytest.mark.parametrize("family", FAMILIES)
def test_channel_mask_equals_slicing(family):
    model = tiny_encoder(family)
    batch = tiny_batches(family)[0]
    keep = {0: list(range(0, INTERMEDIATE, 3)), 1: [5, 7, 40]}
    with ChannelGates(EncoderAdapter(model)) as gates:
        gates.set_masks(keep)
        masked = run(model, batch)
    sliced = copy.deepcopy(model)
    apply_encoder_step(EncoderAdapter(sliced), PlanStep("head_prune", {}, [LayerPlan(i, keep_channels=k) for i, k in keep.items()]))
    assert (masked - run(sliced, batch)).abs().max() < 1e-5


# ------------------------------------------------------------------------------------ forward scores
@pytest.mark.parametrize("family", FAMILIES)
def test_output_norm_and_usage_match_brute_force(family):
    model = tiny_encoder(family)
    adapter = EncoderAdapter(model)
    batches = tiny_batches(family)
    inputs = o_inputs(adapter, batches)
    for i in range(LAYERS):
        w_o = adapter.linear(i, "o").weight.detach().double()
        total = torch.zeros(HEADS, dtype=torch.float64)
        top1 = torch.zeros(HEADS, dtype=torch.long)
        examples = []
        for batch, x in zip(batches, inputs[i]):
            x = x.double()
            mask = mask_of(batch, x)
            norms = torch.stack([(x[..., h * HEAD_DIM:(h + 1) * HEAD_DIM] @ w_o[:, h * HEAD_DIM:(h + 1) * HEAD_DIM].T).norm(dim=-1)
                                 for h in range(HEADS)], dim=-1) * mask[..., None]  # [B, T, H]
            total += norms.sum(dim=(0, 1))
            for b in range(x.shape[0]):
                for t in range(x.shape[1]):
                    if mask[b, t]:
                        top1[int(norms[b, t].argmax())] += 1
                examples.append(int(norms[b].sum(0).argmax()))
        assert torch.allclose(OutputNormScore().score(adapter, batches)[i], total, rtol=1e-9, atol=0)
        assert torch.equal(UsageTop1Score().score(adapter, batches)[i], top1.double())
        assert example_top1_heads(adapter, batches)[i].tolist() == examples
        stats = head_contribution_stats(adapter, batches)
        assert torch.equal(stats["output_norm"][i], OutputNormScore().score(adapter, batches)[i])
        assert stats["example_top1"][i].tolist() == examples


@pytest.mark.parametrize("family", FAMILIES)
def test_usage_counts_sum_to_tokens_and_examples(family):
    adapter = EncoderAdapter(tiny_encoder(family))
    batches = tiny_batches(family)
    usage = UsageTop1Score().score(adapter, batches)
    per_example = example_usage_top1(adapter, batches)
    for i in range(LAYERS):
        assert usage[i].dtype == torch.float64 and usage[i].shape == (HEADS,)
        assert int(usage[i].sum()) == counted_tokens(batches, family)
        assert per_example[i].shape == (HEADS,) and int(per_example[i].sum()) == 6


@pytest.mark.parametrize("family", FAMILIES)
def test_weight_norm_formulas(family):
    adapter = EncoderAdapter(tiny_encoder(family))
    heads = WeightNormScore().score(adapter, None)
    channels = ChannelWeightNormScore().score(adapter, None)
    for i in range(LAYERS):
        w_v = adapter.linear(i, "v").weight.detach().double()
        w_o = adapter.linear(i, "o").weight.detach().double()
        expected = [w_v[h * HEAD_DIM:(h + 1) * HEAD_DIM].norm() * w_o[:, h * HEAD_DIM:(h + 1) * HEAD_DIM].norm()
                    for h in range(HEADS)]
        assert torch.allclose(heads[i], torch.stack(expected), rtol=1e-12)
        up, down = adapter.linear(i, "up").weight.detach().double(), adapter.linear(i, "down").weight.detach().double()
        expected = [up[c].norm() * down[:, c].norm() for c in range(INTERMEDIATE)]
        assert torch.allclose(channels[i], torch.stack(expected), rtol=1e-12)


@pytest.mark.parametrize("family", ["bert", "vit"])
def test_channel_output_norm_matches_brute_force(family):
    adapter = EncoderAdapter(tiny_encoder(family))
    batches = tiny_batches(family)
    captured = [[] for _ in range(LAYERS)]
    handles = [adapter.ffn_consumer(i).register_forward_pre_hook(
        lambda module, args, i=i: captured[i].append(args[0].detach().clone())) for i in range(LAYERS)]
    for batch in batches:
        run(adapter.model, batch)
    for handle in handles:
        handle.remove()
    scores = ChannelOutputNormScore().score(adapter, batches)
    for i in range(LAYERS):
        down = adapter.linear(i, "down").weight.detach().double()
        total = sum((x.double().abs() * mask_of(b, x)[..., None]).sum(dim=(0, 1)) for b, x in zip(batches, captured[i]))
        assert torch.allclose(scores[i], total * down.norm(dim=0), rtol=1e-9)


def test_padding_does_not_change_scores():
    # float64: in float32 the padded attention sums in another order, and the smallest Taylor
    # scores (gradients ~1e-5) then move by a few 1e-4 relative, which says nothing about padding.
    adapter = EncoderAdapter(tiny_encoder("bert").double())
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 100, (3, 8), generator=g)
    plain = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    padded = [{"input_ids": torch.cat([ids, torch.zeros(3, 4, dtype=torch.long)], dim=1),
               "attention_mask": torch.cat([torch.ones_like(ids), torch.zeros(3, 4, dtype=torch.long)], dim=1)}]
    for scorer in (OutputNormScore(), AblationScore(), TaylorGateScore(), ChannelOutputNormScore()):
        a, b = scorer.score(adapter, plain), scorer.score(adapter, padded)
        for x, y in zip(a, b):
            assert torch.allclose(x, y, rtol=1e-9, atol=0), type(scorer).__name__
    assert all(torch.equal(x, y) for x, y in zip(UsageTop1Score().score(adapter, plain),
                                                  UsageTop1Score().score(adapter, padded)))
    assert all(torch.equal(x, y) for x, y in zip(example_usage_top1(adapter, plain), example_usage_top1(adapter, padded)))


# ------------------------------------------------------------------------------------ Taylor
def independent_infonce(model, batch, family, temperature=0.05):
    """SimCSE-style InfoNCE written out again (not through head_scores)."""
    hidden = model(**batch).last_hidden_state
    if family == "bert":
        m = batch["attention_mask"].to(hidden.dtype)[..., None]
        z = F.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)
        z2 = z
    else:
        z = F.normalize(torch.cat([hidden[:, 0], hidden[:, 1:].mean(1)], dim=-1), dim=-1)
        flipped = model(pixel_values=torch.flip(batch["pixel_values"], dims=[3])).last_hidden_state
        z2 = F.normalize(torch.cat([flipped[:, 0], flipped[:, 1:].mean(1)], dim=-1), dim=-1)
    logits = z @ z2.T / temperature
    return F.cross_entropy(logits, torch.arange(len(z)))


def first_features_cubed(model, batch):
    """A custom loss (the mean square would be constant after BERT's final LayerNorm)."""
    return model(**batch).last_hidden_state[..., :8].pow(3).mean()


@pytest.mark.parametrize("family,custom", [("bert", False), ("vit", False), ("clip", False), ("bert", True)])
def test_taylor_matches_finite_differences(family, custom):
    model = tiny_encoder(family).double()
    adapter = EncoderAdapter(model)
    batch = tiny_batches(family)[0]
    if family != "bert":
        batch = {"pixel_values": batch["pixel_values"].double()}
    scorer = TaylorGateScore(loss_fn=first_features_cubed) if custom else TaylorGateScore()
    scores = scorer.score(adapter, [batch])
    tokens = counted_tokens([batch], family)
    loss = (lambda: first_features_cubed(model, batch)) if custom else (lambda: independent_infonce(model, batch, family))
    eps = 2.0 ** -12
    with torch.no_grad(), HeadGates(adapter, dtype=torch.float64) as gates:
        for layer, head in ((0, 1), (1, 3)):
            values = torch.ones(HEADS, dtype=torch.float64)
            values[head] = 1 + eps
            gates.set(layer, values)
            up = loss()
            values[head] = 1 - eps
            gates.set(layer, values)
            down = loss()
            gates.reset()
            expected = abs(float(up - down)) / (2 * eps) / tokens
            assert expected > 0
            assert float(scores[layer][head]) == pytest.approx(expected, rel=1e-5)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_taylor_restores_model_state_and_sums_batches():
    model = tiny_encoder("bert")
    adapter = EncoderAdapter(model)
    model.train()
    frozen = model.embeddings.word_embeddings.weight
    frozen.requires_grad_(False)
    batches = tiny_batches("bert")
    both = TaylorGateScore().score(adapter, batches)
    assert model.training and not frozen.requires_grad
    assert all(p.requires_grad for p in model.parameters() if p is not frozen)
    assert all(p.grad is None for p in model.parameters())
    # Σ_batches |g_b| / Σ_batches tokens
    singles = [TaylorGateScore().score(adapter, [b]) for b in batches]
    tokens = [counted_tokens([b], "bert") for b in batches]
    for i in range(LAYERS):
        combined = sum(s[i] * t for s, t in zip(singles, tokens)) / sum(tokens)
        assert torch.allclose(both[i], combined, rtol=1e-9)


def test_contrastive_needs_two_examples():
    adapter = EncoderAdapter(tiny_encoder("bert"))
    batch = {k: v[:1] for k, v in tiny_batches("bert")[0].items()}
    with pytest.raises(CompressError, match="at least 2 examples"):
        TaylorGateScore().score(adapter, [batch])


# ------------------------------------------------------------------------------------ ablation
@pytest.mark.parametrize("family", ["bert", "vit"])
def test_ablation_matches_a_sliced_model(family):
    model = tiny_encoder(family)
    adapter = EncoderAdapter(model)
    batches = tiny_batches(family)
    scores = AblationScore().score(adapter, batches)
    for layer, head in ((0, 2), (1, 0)):
        sliced = copy.deepcopy(model)
        sliced_adapter = EncoderAdapter(sliced)
        keep = [h for h in range(HEADS) if h != head]
        apply_encoder_step(sliced_adapter, PlanStep("head_prune", {}, [LayerPlan(layer, keep_heads=keep)]))
        expected = 0.0
        for batch in batches:
            outputs = []
            for a in (adapter, sliced_adapter):
                handle = a.layers[layer].register_forward_hook(lambda m, args, out: outputs.append(out))
                run(a.model, batch)
                handle.remove()
            diff = (outputs[0] - outputs[1]).double()
            expected += float((diff.square().sum(-1) * mask_of(batch, diff)).sum())
        assert float(scores[layer][head]) == pytest.approx(expected, rel=1e-3)


# ------------------------------------------------------------------------------------ misc
@pytest.mark.parametrize("family", ["bert", "clip"])
def test_scores_are_deterministic(family):
    adapter = EncoderAdapter(tiny_encoder(family))
    batches = tiny_batches(family)
    for registry in (HEAD_SCORES, CHANNEL_SCORES):
        for name, cls in registry.items():
            first, second = cls().score(adapter, batches), cls().score(adapter, batches)
            widths = [HEADS if registry is HEAD_SCORES else INTERMEDIATE] * LAYERS
            assert [t.shape[0] for t in first] == widths, name
            assert all(t.dtype == torch.float64 for t in first), name
            assert all(torch.equal(x, y) for x, y in zip(first, second)), name
            assert all(bool((t >= 0).all()) for t in first), name


@pytest.mark.parametrize("family", ["bert", "vit"])
def test_layer_without_attention_gets_empty_scores(family):
    model = tiny_encoder(family)
    adapter = EncoderAdapter(model)
    apply_encoder_step(adapter, PlanStep("head_prune", {}, [LayerPlan(0, keep_heads=[]), LayerPlan(1, keep_heads=[0, 1, 3])]))
    batches = tiny_batches(family)
    for name, cls in HEAD_SCORES.items():
        scores = cls().score(adapter, batches)
        assert scores[0].numel() == 0 and scores[0].dtype == torch.float64, name
        assert scores[1].shape == (3,), name
    usage = example_usage_top1(adapter, batches)
    assert usage[0].numel() == 0 and int(usage[1].sum()) == 6
    with HeadGates(adapter) as gates:
        assert gates.gate(0).numel() == 0 and gates.gate(1).shape == (3,)
    normalised = normalise_michel(OutputNormScore().score(adapter, batches))
    assert normalised[0].numel() == 0 and normalised[1].shape == (3,)


def test_normalise_michel():
    scores = [torch.tensor([3.0, 4.0], dtype=torch.float64), torch.zeros(0, dtype=torch.float64),
              torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)]
    out = normalise_michel(scores)
    # per-layer L2: [0.6, 0.8], [], [1, 0, 0]; global min 0, max 1
    assert torch.allclose(out[0], torch.tensor([0.6, 0.8], dtype=torch.float64))
    assert out[1].numel() == 0
    assert torch.allclose(out[2], torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    assert all(torch.equal(t, torch.zeros(2, dtype=torch.float64)) for t in normalise_michel([torch.ones(2), torch.ones(2)]))
