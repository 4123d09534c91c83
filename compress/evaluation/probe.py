"""Linear probes on frozen encoder features (no scikit-learn).

A multinomial logistic regression fitted in float64 with torch's L-BFGS on standardised features:
the usual way to score how much class information an (un)pruned encoder keeps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F



@dataclass(frozen=True)
class Probe:
    """A fitted probe. ``mean``/``std`` [d]: the standardisation; ``weight`` [d, c], ``bias`` [c]
    act on standardised features; ``classes`` [c]: the label value of each output column.
    All float64 except ``classes`` (int64)."""

    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    classes: torch.Tensor

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """features [n, d] -> float64 logits [n, c]."""
        standardised = (features.detach().cpu().double() - self.mean) / self.std
        return standardised @ self.weight + self.bias

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """features [n, d] -> predicted labels [n] (int64, values from ``classes``)."""
        return self.classes[self.logits(features).argmax(dim=1)]

    def accuracy(self, features: torch.Tensor, labels: torch.Tensor) -> float:
        """Share of rows of features [n, d] whose predicted label equals labels [n]."""
        labels = torch.as_tensor(labels).cpu().long()
        return float((self.predict(features) == labels).double().mean())


def fit_logistic_probe(
    features: torch.Tensor, labels: torch.Tensor, l2: float = 1e-3, max_iter: int = 200, seed: int = 0
) -> Probe:
    """Fit softmax regression to features [n, d] and integer labels [n].

    Minimises mean cross-entropy + ``l2``/2 * ||weight||^2 (bias unpenalised) on features
    standardised with their own mean/std, in float64, with L-BFGS (strong-Wolfe line search) for
    at most ``max_iter`` iterations. ``seed`` draws the small initial weights, so a fit is
    deterministic for a given seed.
    """
    x = features.detach().cpu().double()
    labels = torch.as_tensor(labels).cpu().long()
    if x.dim() != 2 or labels.shape != (x.shape[0],):
        raise ValueError(f"need features [n, d] and labels [n]; got {tuple(x.shape)} and {tuple(labels.shape)}")
    classes, targets = torch.unique(labels, return_inverse=True)
    if len(classes) < 2:
        raise ValueError("a probe needs at least two classes in the labels")
    mean = x.mean(dim=0)
    std = x.std(dim=0, unbiased=False)
    std = torch.where(std > 1e-12, std, torch.ones_like(std))  # constant features stay constant
    standardised = (x - mean) / std

    generator = torch.Generator().manual_seed(seed)
    weight = (1e-3 * torch.randn(x.shape[1], len(classes), generator=generator, dtype=torch.float64)).requires_grad_()
    bias = torch.zeros(len(classes), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
        tolerance_grad=1e-9, tolerance_change=1e-12,
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(standardised @ weight + bias, targets) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return Probe(mean=mean, std=std, weight=weight.detach(), bias=bias.detach(), classes=classes)
