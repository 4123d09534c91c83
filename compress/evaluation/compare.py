"""How closely a model reproduces a reference model's next-token distributions.

Measured over the same predicted positions as perplexity (every position but the last of each
window), so the figures line up with ``compress.evaluation.paired``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from compress.evaluation.perplexity import check_windows, eval_mode, model_device
from compress.progress import progress_bar


@dataclass(frozen=True)
class LogitComparison:
    """``top1_agreement``: share of positions where both argmax tokens match (0..1);
    ``mean_kl``: mean per-position KL(reference || model) in nats; ``max_abs_diff``: the largest
    absolute difference between any pair of logits."""

    top1_agreement: float
    mean_kl: float
    max_abs_diff: float


def compare_logits(
    reference_model, model, windows: torch.Tensor, batch_size: int = 8, progress: bool = False
) -> LogitComparison:
    """Compare ``model`` with ``reference_model`` on ``windows`` LongTensor [w, seqlen], seqlen >= 2.

    Each model runs on its own device; the comparison happens on ``model``'s device. Sums are
    accumulated in float64.
    """
    check_windows(windows, min_seqlen=2)
    device = model_device(model)
    kl_sum = torch.zeros((), dtype=torch.float64, device=device)
    agreeing = torch.zeros((), dtype=torch.int64, device=device)
    max_abs_diff = torch.zeros((), dtype=torch.float32, device=device)
    batches = windows.split(batch_size)
    with torch.no_grad(), eval_mode(reference_model), eval_mode(model):
        for batch in progress_bar(batches, "comparing logits", enabled=progress, total=len(batches)):
            reference = _predicting_logits(reference_model, batch).to(device)
            candidate = _predicting_logits(model, batch)
            _check_same_vocab(reference, candidate)
            kl_sum += token_kl(reference, candidate).sum(dtype=torch.float64)
            agreeing += (reference.argmax(-1) == candidate.argmax(-1)).sum()
            max_abs_diff = torch.maximum(max_abs_diff, (reference - candidate).abs().max())
    positions = windows.shape[0] * (windows.shape[1] - 1)
    return LogitComparison(
        top1_agreement=int(agreeing) / positions,
        mean_kl=float(kl_sum) / positions,
        max_abs_diff=float(max_abs_diff),
    )


def token_kl(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(reference) || softmax(logits)) per position: [..., vocab] -> [...] (float32)."""
    reference_logp = F.log_softmax(reference_logits, dim=-1)
    logp = F.log_softmax(logits, dim=-1)
    return (reference_logp.exp() * (reference_logp - logp)).sum(-1)


def _predicting_logits(model, batch: torch.Tensor) -> torch.Tensor:
    """float32 logits [b, seqlen - 1, vocab] at the positions that predict a token of the window."""
    logits = model(input_ids=batch.to(model_device(model))).logits
    return logits[:, :-1].float()


def _check_same_vocab(reference: torch.Tensor, candidate: torch.Tensor) -> None:
    if reference.shape != candidate.shape:
        raise ValueError(
            f"the models' logits differ in shape ({tuple(reference.shape)} vs {tuple(candidate.shape)}); "
            "they must share a vocabulary"
        )
