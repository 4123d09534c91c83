"""Label-free quality of a pruned encoder: how close its embeddings stay to the dense model's.

Text encoders (sentence-transformers convention, as all-MiniLM-L6-v2 is used): the sentence
embedding is the mean of ``last_hidden_state`` over the attention mask, L2-normalised. Vision
encoders: ``[CLS ; mean of patch tokens]`` of ``last_hidden_state`` ([n, 2·hidden]), the feature a
linear probe reads. Figures:

- mean / min cosine between dense and pruned embeddings of the same inputs;
- Spearman rank correlation between the dense and pruned cosine similarities of a fixed, seeded
  set of input pairs (does the pruned model still order pairs by similarity as the dense one?).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch


def prefix_tokens(adapter) -> int:
    """Tokens before the patches in an image encoder's sequence: CLS (1), DeiT's distillation token
    (2), DINOv2 register tokens (1 + registers)."""
    if adapter.family == "deit":
        return 2
    return 1 + int(getattr(adapter.config, "num_register_tokens", 0) or 0)


def pooled_embedding(last_hidden_state: torch.Tensor, batch: dict, modality: str, prefix: int = 1,
                     token_sizes: torch.Tensor | None = None, kept_positions: torch.Tensor | None = None) -> torch.Tensor:
    """[n, hidden] (text: mean over the attention mask) or [n, 2·hidden] (image: CLS ; mean of the
    patch tokens, from ``prefix`` on); not normalised.

    ``last_hidden_state`` [n, T, hidden]; ``batch`` the model inputs (its ``attention_mask`` [n, T]
    selects the text tokens that count; every token without one). A token-pruned encoder also gives
    ``token_sizes`` [n, T] (0 = padding, k = k merged tokens) and ``kept_positions`` [n, T] (original
    indices): the means are then weighted by size, so a merged token counts as the tokens it holds,
    and the image prefix is found by original position (ToMe moves DeiT's distillation token)."""
    if modality not in ("text", "image"):
        raise ValueError(f"unknown modality {modality!r} (text or image)")
    if token_sizes is not None:
        weights = token_sizes.to(last_hidden_state.dtype)
        if modality == "image":
            weights = weights * (kept_positions >= prefix).to(weights.dtype)
        weights = weights.unsqueeze(-1)
        mean = (last_hidden_state * weights).sum(1) / weights.sum(1).clamp_min(1e-6)
        return torch.cat([last_hidden_state[:, 0], mean], dim=-1) if modality == "image" else mean
    if modality == "image":
        return torch.cat([last_hidden_state[:, 0], last_hidden_state[:, prefix:].mean(1)], dim=-1)
    mask = batch.get("attention_mask")
    if mask is None:
        return last_hidden_state.mean(1)
    weights = mask.to(last_hidden_state.device, last_hidden_state.dtype).unsqueeze(-1)
    return (last_hidden_state * weights).sum(1) / weights.sum(1).clamp_min(1)


@torch.no_grad()
def encoder_embeddings(adapter, batches, *, normalize: bool = True, device: str | torch.device | None = None) -> torch.Tensor:
    """[n, d] float64 pooled embeddings of ``adapter.model`` on every batch (L2-normalised when
    ``normalize``)."""
    model = adapter.model
    device = device or next(model.parameters()).device
    prefix = prefix_tokens(adapter)
    out = []
    for batch in batches:
        inputs = {k: v.to(device) for k, v in batch.items()}
        output = model(**inputs)
        pooled = pooled_embedding(output.last_hidden_state, inputs, adapter.modality, prefix,
                                  getattr(output, "token_sizes", None), getattr(output, "kept_positions", None))
        pooled = pooled.double().cpu()
        out.append(torch.nn.functional.normalize(pooled, dim=-1) if normalize else pooled)
    return torch.cat(out)


def similarity_pairs(n: int, count: int, seed: int = 0) -> list[tuple[int, int]]:
    """``count`` distinct unordered pairs (i < j) of ``n`` items, seeded."""
    rng = random.Random(seed)
    pairs: set[tuple[int, int]] = set()
    limit = n * (n - 1) // 2
    if n < 2:
        return []
    while len(pairs) < min(count, limit):
        i, j = rng.sample(range(n), 2)
        pairs.add((min(i, j), max(i, j)))
    return sorted(pairs)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two [n] vectors (average ranks for ties)."""
    def ranks(x: torch.Tensor) -> torch.Tensor:
        order = x.double().argsort()
        r = torch.empty_like(order, dtype=torch.float64)
        r[order] = torch.arange(len(x), dtype=torch.float64)
        for value in x.unique():  # ties share their mean rank
            tied = x == value
            if tied.sum() > 1:
                r[tied] = r[tied].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = (ra.norm() * rb.norm()).item()
    return float((ra @ rb).item() / denominator) if denominator > 0 else float("nan")


@dataclass
class EmbeddingAgreement:
    mean_cosine: float
    min_cosine: float
    spearman: float
    items: int
    pairs: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def embedding_agreement(dense: torch.Tensor, pruned: torch.Tensor, pairs: int = 200, seed: int = 0) -> EmbeddingAgreement:
    """Compare embeddings [n, d] of the same inputs (L2-normalised here; see the module docstring)."""
    dense = torch.nn.functional.normalize(dense.double(), dim=-1)
    pruned = torch.nn.functional.normalize(pruned.double(), dim=-1)
    cosine = (dense * pruned).sum(-1)
    chosen = similarity_pairs(len(dense), pairs, seed)
    if chosen:
        i, j = torch.tensor(chosen).T
        rho = spearman((dense[i] * dense[j]).sum(-1), (pruned[i] * pruned[j]).sum(-1))
    else:
        rho = float("nan")
    return EmbeddingAgreement(mean_cosine=float(cosine.mean()), min_cosine=float(cosine.min()), spearman=rho,
                              items=len(dense), pairs=len(chosen))
