"""The multi-domain evaluation protocol: per-domain figures against independent computations, the
dense cache, the summary (geometric mean, worst), generations and the distillation loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from compress.evaluation import compare_logits, perplexity
from compress.evaluation import protocol
from compress.evaluation.protocol import (
    compare,
    continuation_ppl,
    dense_figures,
    evaluate_model,
    measure_domain,
    repetition,
    summarise,
)
from compress.training import distillation_loss
from tests.conftest import tiny_model


@pytest.fixture
def windows():
    return torch.randint(0, 128, (5, 24), generator=torch.Generator().manual_seed(3))


def naive_figures(model, windows):
    """NLL sum, correct count and argmax, one window at a time, straight from the logits."""
    nll, correct, argmax = 0.0, 0, []
    with torch.no_grad():
        for window in windows:
            logits = model(input_ids=window[None]).logits[0, :-1].double()
            targets = window[1:]
            nll += float(F.cross_entropy(logits, targets, reduction="sum"))
            argmax.append(logits.argmax(-1))
            correct += int((argmax[-1] == targets).sum())
    return nll, correct, torch.stack(argmax)


def test_domain_figures_match_a_naive_computation_whatever_the_chunking(windows, monkeypatch):
    model = tiny_model()
    nll, correct, argmax = naive_figures(model, windows)
    for chunk in (512, 7):  # rows of the log-softmax at a time; 7 splits windows mid-way
        monkeypatch.setattr(protocol, "ROW_CHUNK", chunk)
        figures, kl = measure_domain(model, windows, batch_size=2, progress=False)
        assert kl is None
        assert figures.nll == pytest.approx(nll, rel=1e-6)
        assert figures.correct == correct and torch.equal(figures.argmax, argmax.to(torch.int32))
        assert figures.tokens == 5 * 23
        assert figures.ppl == pytest.approx(perplexity(model, windows, batch_size=3, progress=False).ppl, rel=1e-6)


def test_agreement_and_kl_match_compare_logits(windows):
    dense, other = tiny_model(seed=0), tiny_model(seed=1)
    reference, _ = measure_domain(dense, windows, progress=False)
    figures, kl = measure_domain(other, windows, batch_size=2, progress=False, reference_model=dense)
    expected = compare_logits(dense, other, windows)
    comparison = compare(reference, figures, kl)
    assert comparison.agreement == pytest.approx(expected.top1_agreement)
    assert comparison.mean_kl == pytest.approx(expected.mean_kl, rel=1e-5)
    assert comparison.mean_kl > 0.01  # two different models: the check is not vacuous


def test_dense_figures_are_cached_by_weights_and_windows(windows, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path))
    model = tiny_model()
    first = dense_figures(model, {"a": windows}, progress=False)
    assert not first.cached
    calls = []
    original = protocol.measure_domain
    monkeypatch.setattr(protocol, "measure_domain", lambda *a, **k: calls.append(1) or original(*a, **k))
    again = dense_figures(model, {"a": windows}, progress=False)
    assert again.cached and not calls
    assert again.domains["a"].nll == first.domains["a"].nll and torch.equal(again.domains["a"].argmax,
                                                                           first.domains["a"].argmax)
    with torch.no_grad():  # other weights, or other windows: a miss
        model.model.layers[0].mlp.down_proj.weight[0, 0] += 1.0
    assert not dense_figures(model, {"a": windows}, progress=False).cached
    assert not dense_figures(model, {"a": windows[:3]}, progress=False).cached
    for path in (tmp_path / "evaluations").iterdir():  # a torn cache file is only a miss
        path.write_bytes(b"torn")
    assert not dense_figures(model, {"a": windows}, progress=False).cached


def test_summary_gives_the_geometric_mean_and_the_worst_domain():
    rows = {"a": {"ppl_ratio": 2.0, "pruned_accuracy": 0.5}, "b": {"ppl_ratio": 8.0, "pruned_accuracy": 0.3},
            "c": {"ppl_ratio": None, "pruned_accuracy": 0.4}}
    summary = summarise(rows)
    assert summary["geomean_ppl_ratio"] == pytest.approx(4.0)
    assert summary["worst_dataset"] == "b" and summary["worst_ppl_ratio"] == 8.0
    assert summary["pruned_accuracy"] == pytest.approx(0.4)
    assert summary["top1_agreement"] is None


def test_a_model_against_itself_has_ratio_one_and_full_agreement(windows, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path))
    model = tiny_model()
    dense = dense_figures(model, {"x": windows, "y": windows[:2]}, progress=False)
    section = evaluate_model(model, {"x": windows, "y": windows[:2]}, {"x": "src-x", "y": "src-y"}, seqlen=24,
                             max_windows=5, dense=dense, progress=False).section()
    assert section["geomean_ppl_ratio"] == pytest.approx(1.0) and section["top1_agreement"] == 1.0
    assert section["datasets"]["x"]["source"] == "src-x" and section["datasets"]["y"]["windows"] == 2


def test_repetition_counts_repeated_four_grams():
    assert repetition([1, 2, 3, 4, 5, 6]) == 0.0
    assert repetition([1, 2, 3, 4] * 3) == pytest.approx(1 - 4 / 9)  # 9 four-grams, 4 distinct
    assert repetition([1, 2, 3]) == 0.0


def test_continuation_perplexity_is_the_conditional_perplexity():
    model = tiny_model()
    prompt, continuation = [5, 6, 7], [8, 9, 10, 11]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + continuation])).logits[0]
    nll = [-F.log_softmax(logits[i - 1], -1)[token] for i, token in zip(range(3, 7), continuation)]
    assert continuation_ppl(model, prompt, continuation) == pytest.approx(math.exp(float(sum(nll)) / 4), rel=1e-5)


def test_distillation_loss_is_the_mean_token_kl_and_zero_against_itself():
    logits = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(0))
    teacher = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(1))
    expected = (F.softmax(teacher, -1) * (F.log_softmax(teacher, -1) - F.log_softmax(logits, -1))).sum(-1).mean()
    assert distillation_loss(logits, teacher) == pytest.approx(float(expected), rel=1e-5)
    assert distillation_loss(teacher, teacher) == pytest.approx(0.0, abs=1e-6)
    hot = distillation_loss(logits, teacher, temperature=2.0)
    t_expected = 4 * (F.softmax(teacher / 2, -1) * (F.log_softmax(teacher / 2, -1) - F.log_softmax(logits / 2, -1))).sum(-1).mean()
    assert hot == pytest.approx(float(t_expected), rel=1e-5)
