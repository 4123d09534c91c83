"""Dense vs compressed evaluation in one sweep: both perplexities, top-1 agreement and KL.

Each batch of windows goes through both models once, so comparing costs no more than measuring
the two perplexities separately. Sums are accumulated in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from compress.progress import progress_bar


@dataclass
class PairedResult:
    dense_ppl: float
    pruned_ppl: float
    top1_agreement: float
    mean_kl: float
    tokens: int

    @property
    def ppl_ratio(self) -> float:
        return self.pruned_ppl / self.dense_ppl


def _token_nll(logits: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL (float64) of logits [b, t, vocab] for windows [b, t]."""
    predicted = logits[:, :-1].float()
    targets = windows[:, 1:].to(predicted.device)
    return F.cross_entropy(predicted.reshape(-1, predicted.shape[-1]), targets.reshape(-1), reduction="sum").double()


@torch.no_grad()
def paired_evaluation(dense, pruned, windows: torch.Tensor, batch_size: int = 8, progress: bool = True, description: str = "evaluating") -> PairedResult:
    """Compare ``pruned`` with ``dense`` on ``windows`` [w, seqlen].

    KL is KL(dense || pruned) per predicted position, averaged over positions; agreement is the
    share of positions where both models' argmax tokens match.
    """
    device = next(pruned.parameters()).device
    nll_dense = nll_pruned = kl_sum = torch.zeros((), dtype=torch.float64)
    agree = tokens = 0
    batches = windows.split(batch_size)
    for batch in progress_bar(batches, description, enabled=progress, total=len(batches)):
        batch = batch.to(device)
        logits_dense = dense(input_ids=batch).logits
        logits_pruned = pruned(input_ids=batch).logits
        nll_dense = nll_dense + _token_nll(logits_dense, batch).cpu()
        nll_pruned = nll_pruned + _token_nll(logits_pruned, batch).cpu()
        logp_dense = F.log_softmax(logits_dense[:, :-1].float(), dim=-1)
        logp_pruned = F.log_softmax(logits_pruned[:, :-1].float(), dim=-1)
        # Per-position KL in float32 (a sum over the vocabulary), accumulated over positions in float64.
        kl_per_position = (logp_dense.exp() * (logp_dense - logp_pruned)).sum(dim=-1)
        kl_sum = kl_sum + kl_per_position.double().sum().cpu()
        agree += int((logits_dense[:, :-1].argmax(-1) == logits_pruned[:, :-1].argmax(-1)).sum())
        tokens += batch[:, 1:].numel()
    return PairedResult(
        dense_ppl=math.exp(float(nll_dense) / tokens),
        pruned_ppl=math.exp(float(nll_pruned) / tokens),
        top1_agreement=agree / tokens,
        mean_kl=float(kl_sum) / tokens,
        tokens=tokens,
    )
