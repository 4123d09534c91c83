"""Perplexity and logit comparison on tiny random decoders."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from compress.evaluation import LogitComparison, PerplexityResult, compare_logits, perplexity
from conftest import tiny_model


def reference_perplexity(model, windows: torch.Tensor) -> float:
    """One window at a time, CrossEntropy over the shifted tokens, float64 sum."""
    total, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            logits = model(input_ids=window[None]).logits[0]
            total += F.cross_entropy(logits[:-1].double(), window[1:], reduction="sum").item()
            count += window.numel() - 1
    return math.exp(total / count)


def test_perplexity_matches_a_per_window_loop(tiny_llama, tiny_batch):
    result = perplexity(tiny_llama, tiny_batch, batch_size=4, progress=False)
    assert isinstance(result, PerplexityResult)
    assert result.tokens == 6 * 15
    assert result.ppl == pytest.approx(reference_perplexity(tiny_llama, tiny_batch), rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(result.nll), rel=1e-12)


def test_perplexity_does_not_depend_on_batch_size(tiny_llama, tiny_batch):
    one_by_one = perplexity(tiny_llama, tiny_batch, batch_size=1, progress=False)
    all_at_once = perplexity(tiny_llama, tiny_batch, batch_size=64, progress=False)
    assert one_by_one.ppl == pytest.approx(all_at_once.ppl, rel=1e-5)


def test_perplexity_with_progress_bar(tiny_llama, tiny_batch):
    assert perplexity(tiny_llama, tiny_batch, progress=True).tokens == 90


def test_perplexity_restores_train_mode(tiny_llama, tiny_batch):
    tiny_llama.train()
    perplexity(tiny_llama, tiny_batch, progress=False)
    assert tiny_llama.training


@pytest.mark.parametrize("windows", [torch.zeros(4, dtype=torch.long), torch.zeros(3, 1, dtype=torch.long), torch.zeros(2, 4)])
def test_perplexity_rejects_bad_windows(tiny_llama, windows):
    with pytest.raises(ValueError, match="window"):
        perplexity(tiny_llama, windows, progress=False)


def test_compare_a_model_with_itself(tiny_llama, tiny_batch):
    comparison = compare_logits(tiny_llama, tiny_llama, tiny_batch, batch_size=4)
    assert isinstance(comparison, LogitComparison)
    assert comparison.top1_agreement == 1.0
    assert comparison.mean_kl == pytest.approx(0.0, abs=1e-7)
    assert comparison.max_abs_diff == 0.0


def test_compare_two_models_matches_a_direct_computation(tiny_batch):
    reference, other = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    comparison = compare_logits(reference, other, tiny_batch, batch_size=4)
    with torch.no_grad():
        ref_logits = reference(input_ids=tiny_batch).logits[:, :-1].double()
        logits = other(input_ids=tiny_batch).logits[:, :-1].double()
    ref_logp, logp = ref_logits.log_softmax(-1), logits.log_softmax(-1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean().item()
    agreement = (ref_logits.argmax(-1) == logits.argmax(-1)).double().mean().item()
    assert comparison.mean_kl == pytest.approx(kl, rel=1e-4)
    assert comparison.top1_agreement == pytest.approx(agreement)
    assert comparison.max_abs_diff == pytest.approx((ref_logits - logits).abs().max().item(), rel=1e-5)
    assert 0.0 < comparison.top1_agreement < 1.0 and comparison.mean_kl > 0.0


def test_compare_rejects_different_vocabularies(tiny_batch):
    with pytest.raises(ValueError, match="vocabulary"):
        compare_logits(tiny_model("llama"), tiny_model("llama", vocab_size=256), tiny_batch)
