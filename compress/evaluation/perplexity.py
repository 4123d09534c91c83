"""Perplexity of a causal LM over token windows.

Every window is a full, unpadded sequence; position ``t`` predicts token ``t + 1``, so a window of
``seqlen`` tokens yields ``seqlen - 1`` predictions. Perplexity is exp(mean NLL over all of them),
the NLL summed in float64 so the figure does not depend on the batch size.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

from compress.progress import progress_bar


@dataclass(frozen=True)
class PerplexityResult:
    """``ppl`` = exp(``nll``); ``nll`` is the mean NLL per predicted token in nats; ``tokens`` is
    how many tokens were predicted (windows x (seqlen - 1))."""

    ppl: float
    nll: float
    tokens: int


def perplexity(model, windows: torch.Tensor, batch_size: int = 8, progress: bool = True) -> PerplexityResult:
    """Perplexity of ``model`` (an HF causal LM) on ``windows`` LongTensor [w, seqlen], seqlen >= 2.

    The model runs on its own device, ``batch_size`` windows at a time, in eval mode and without
    gradients; its train/eval mode is restored afterwards.
    """
    check_windows(windows, min_seqlen=2)
    device = model_device(model)
    nll_sum = torch.zeros((), dtype=torch.float64, device=device)
    batches = windows.split(batch_size)
    with torch.no_grad(), eval_mode(model):
        for batch in progress_bar(batches, "perplexity", enabled=progress, total=len(batches)):
            batch = batch.to(device)
            logits = model(input_ids=batch).logits
            nll_sum += next_token_nll(logits, batch).sum(dtype=torch.float64)
    tokens = windows.shape[0] * (windows.shape[1] - 1)
    mean_nll = float(nll_sum) / tokens
    return PerplexityResult(ppl=math.exp(mean_nll), nll=mean_nll, tokens=tokens)


def next_token_nll(logits: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """Per-token NLL float32 [b, seqlen - 1] of logits [b, seqlen, vocab] for windows [b, seqlen]."""
    predicting = logits[:, :-1].float()
    targets = windows[:, 1:].to(predicting.device)
    per_token = F.cross_entropy(predicting.flatten(0, 1), targets.flatten(), reduction="none")
    return per_token.view(targets.shape)


def check_windows(windows: torch.Tensor, min_seqlen: int = 1) -> None:
    """Windows must be a non-empty integer tensor [w, seqlen] with seqlen >= ``min_seqlen``."""
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2:
        shape = tuple(windows.shape) if isinstance(windows, torch.Tensor) else type(windows).__name__
        raise ValueError(f"windows must be a LongTensor [w, seqlen], got {shape}")
    if windows.dtype.is_floating_point or windows.dtype == torch.bool:
        raise ValueError(f"windows must hold integer token ids, got {windows.dtype}")
    if windows.shape[0] == 0 or windows.shape[1] < min_seqlen:
        raise ValueError(f"need at least one window of {min_seqlen}+ tokens, got shape {tuple(windows.shape)}")


def model_device(model) -> torch.device:
    """The device of the model's first parameter: where its inputs must go."""
    return next(model.parameters()).device


@contextmanager
def eval_mode(model) -> Iterator[None]:
    """Switch ``model`` to eval mode (no dropout) for the block, then restore its previous mode."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
