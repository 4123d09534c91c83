"""Importance scores for encoder attention heads and FFN channels (the `heads` and `head_routing` passes).

Every scorer has one interface::

    scorer.score(adapter, batches) -> list[torch.Tensor]

one float64 CPU tensor per layer — ``[heads_l]`` for head scores (an empty tensor for a layer whose
attention was removed), ``[intermediate_l]`` for channel scores — higher = more important.
``batches`` is a list of dicts of model inputs (text: ``input_ids``, ``attention_mask``, maybe
``token_type_ids``; image: ``pixel_values``), fed as ``adapter.model(**batch)`` in the given order;
tensors are moved to the model's device. Tokens outside ``attention_mask`` never count; image
batches count every token (CLS, patches and any extra tokens). Scoring runs in eval mode, and
restores the model's training flag (and, for Taylor, its parameters' ``requires_grad``) after.

Notation: layer l has H heads of size D; ``E_h[t]`` [D] is head h's output at token t (its slice of
the o linear's input); ``W_O,h`` = ``W_O[:, h·D:(h+1)·D]`` [hidden, D]; ``‖W_O,h E_h[t]‖₂`` is head h's
contribution to the residual stream at t.

Head scores (`HEAD_SCORES`):

* ``weight_norm`` — `WeightNormScore`: ``‖W_V,h‖_F · ‖W_O,h‖_F`` (data-free).
* ``output_norm`` — `OutputNormScore`: ``Σ_t ‖W_O,h E_h[t]‖₂`` (SpAtten-style, static; forward only).
* ``usage_top1`` — `UsageTop1Score`: number of tokens at which head h has the largest contribution
  in its layer (SHRP-like; ties go to the lowest head index).
* ``taylor_gate`` — `TaylorGateScore`: Michel et al. ``Σ_batches |dL/dξ_h| / tokens`` with the gates
  of `compress.pruning.head_gates.HeadGates`; label-free in-batch InfoNCE by default.
* ``ablation`` — `AblationScore`: exact leave-one-out ``Σ_t ‖Z_l[t] - Z_l,-h[t]‖²`` on layer l's output.

Channel scores (`CHANNEL_SCORES`): ``output_norm`` — `ChannelOutputNormScore`
``Σ_t |a_c(t)| · ‖W_down[:, c]‖``; ``weight_norm`` — `ChannelWeightNormScore`
``‖W_up[c, :]‖ · ‖W_down[:, c]‖``.

Scores read the model as it is, including any `HeadGates` / `ChannelGates` entered *before* the
scorer runs (their hooks run first): to re-score under a mask (Michel's iterative schedule), enter
the masked gates, then score; masked heads then get 0 from the forward scores and from Taylor.
`normalise_michel` is bertology's normalisation (per-layer L2, then global min-max), kept separate.

Everything accumulates in float64 in a fixed order, so scores are deterministic for a given model,
batch list and device.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from compress.errors import CompressError
from compress.evaluation.embeddings import pooled_embedding, prefix_tokens
from compress.pruning.head_gates import HeadGates

__all__ = [
    "CHANNEL_SCORES", "HEAD_SCORES", "AblationScore", "ChannelOutputNormScore", "ChannelWeightNormScore",
    "OutputNormScore", "TaylorGateScore", "UsageTop1Score", "WeightNormScore", "contrastive_loss",
    "example_top1_heads", "example_usage_top1", "head_contribution_stats", "normalise_michel", "pooled_embedding",
    "prefix_tokens", "token_mask",
]


# ------------------------------------------------------------------------------------ helpers
def _device(model: nn.Module) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def token_mask(batch: dict) -> torch.Tensor | None:
    """bool [B, T] of the tokens that count (the text ``attention_mask``), or None: every token counts
    (image batches, text without a mask)."""
    mask = batch.get("attention_mask")
    return None if mask is None else mask.bool()


def _mask_for(mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """bool [B, T] for an activation x [B, T, ...] (all True when ``mask`` is None)."""
    if mask is None:
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    if tuple(mask.shape) != tuple(x.shape[:2]):
        raise CompressError(f"attention_mask of shape {tuple(mask.shape)} does not match activations "
                            f"of shape {tuple(x.shape)}")
    return mask.to(x.device)


def _empty() -> torch.Tensor:
    return torch.zeros(0, dtype=torch.float64)


@contextlib.contextmanager
def _scoring_mode(model: nn.Module, freeze: bool = False):
    """Eval mode (and, with ``freeze``, every parameter's requires_grad False) inside; restored after."""
    training = model.training
    flags = {}
    if freeze:
        for parameter in model.parameters():
            flags.setdefault(parameter, parameter.requires_grad)
            parameter.requires_grad_(False)
    model.eval()
    try:
        yield
    finally:
        model.train(training)
        for parameter, flag in flags.items():
            parameter.requires_grad_(flag)


def _head_slices(adapter, layer_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W_V [H, D, hidden] and W_O [H, hidden, D] of a layer, float64 (detached)."""
    h, d = adapter.widths(layer_index).heads, adapter.head_dim
    wv = adapter.linear(layer_index, "v").weight.detach().to(torch.float64)
    wo = adapter.linear(layer_index, "o").weight.detach().to(torch.float64)
    return wv.reshape(h, d, -1), wo.reshape(wo.shape[0], h, d).permute(1, 0, 2)


# ------------------------------------------------------------------------------------ pooling
def contrastive_loss(adapter, batch: dict, temperature: float = 0.05) -> torch.Tensor:
    """In-batch InfoNCE (SimCSE-style) on `pooled_embedding`: ``CE(z·z'ᵀ/τ, diag)`` over the B examples.

    The positive of example i is a second view: text — the same input (eval mode, so z' = z and the
    diagonal is the self-similarity; the gradient comes from the negatives); image — the horizontally
    flipped image (a second forward). Needs B ≥ 2 (with one example the loss is constant)."""
    model, modality = adapter.model, adapter.modality
    prefix = prefix_tokens(adapter)
    z = F.normalize(pooled_embedding(model(**batch).last_hidden_state, batch, modality, prefix), dim=-1)
    if z.shape[0] < 2:
        raise CompressError("the contrastive loss needs at least 2 examples per calibration batch "
                            "(in-batch negatives); use a larger batch size or a custom loss_fn")
    if modality == "image":
        flipped = dict(batch, pixel_values=batch["pixel_values"].flip(-1))
        z2 = F.normalize(pooled_embedding(model(**flipped).last_hidden_state, flipped, modality, prefix), dim=-1)
    else:
        z2 = z
    logits = z @ z2.transpose(0, 1) / temperature
    return F.cross_entropy(logits, torch.arange(z.shape[0], device=logits.device))


# ------------------------------------------------------------------------------------ head contributions
class _HeadContributions:
    """Forward pre-hooks on every o linear that record, per head, ``‖W_O,h E_h[t]‖₂`` at each
    counted token: its sum (``output_norm``), top-1 counts over tokens (``usage_top1``) and, per
    example, the head with the largest summed contribution (``example_top1``).

    ``‖W_O,h e‖² = eᵀ (W_O,hᵀ W_O,h) e`` with the [D, D] Gram matrix in float64 (cheaper than forming
    the [hidden] vector when D < hidden)."""

    def __init__(self, adapter):
        self.adapter = adapter
        self.mask: torch.Tensor | None = None
        self.attention = [adapter.has_attention(i) for i in range(adapter.num_layers)]
        widths = adapter.all_widths()
        self.sums = [torch.zeros(w.heads, dtype=torch.float64) for w in widths]
        self.top1 = [torch.zeros(w.heads, dtype=torch.long) for w in widths]
        self.example_top1: list[list[torch.Tensor]] = [[] for _ in widths]
        self.grams: list[torch.Tensor | None] = []
        for i in range(adapter.num_layers):
            if not self.attention[i]:
                self.grams.append(None)
                continue
            _, wo = _head_slices(adapter, i)  # [H, hidden, D]
            self.grams.append(wo.transpose(1, 2) @ wo)  # [H, D, D]
        self._handles: list = []

    def __enter__(self):
        for i in range(self.adapter.num_layers):
            if self.attention[i]:
                self._handles.append(self.adapter.attention_consumer(i).register_forward_pre_hook(self._hook(i)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, layer_index: int):
        def hook(module, args):
            self._record(layer_index, args[0])
        return hook

    @torch.no_grad()
    def _record(self, i: int, x: torch.Tensor) -> None:
        gram = self.grams[i].to(x.device)
        heads, d = gram.shape[0], gram.shape[1]
        mask = _mask_for(self.mask, x)
        e = x.detach()[mask].to(torch.float64).reshape(-1, heads, d)  # [N, H, D]
        squares = torch.einsum("nhd,hde,nhe->nh", e, gram, e)
        norms = squares.clamp_min(0).sqrt()  # [N, H]
        self.sums[i] += norms.sum(dim=0).cpu()
        self.top1[i] += torch.bincount(norms.argmax(dim=1), minlength=heads).cpu()
        # Scatter back to [B, T, H] and reduce (deterministic on CUDA, unlike index_add_).
        full = torch.zeros(*mask.shape, heads, dtype=torch.float64, device=norms.device)
        full[mask] = norms
        self.example_top1[i].append(full.sum(dim=1).argmax(dim=1).cpu())

    def run(self, batches: list[dict]) -> "_HeadContributions":
        model = self.adapter.model
        device = _device(model)
        with _scoring_mode(model), torch.no_grad(), self:
            for batch in batches:
                batch = _to_device(batch, device)
                self.mask = token_mask(batch)
                model(**batch)
        self.mask = None
        return self


def head_contribution_stats(adapter, batches: list[dict]) -> dict[str, list[torch.Tensor]]:
    """`OutputNormScore`, `UsageTop1Score` and `example_top1_heads` from one pass over ``batches``:
    ``{"output_norm": [float64 [H]], "usage_top1": [float64 [H]], "example_top1": [int64 [examples]]}``
    (empty tensors for layers without attention)."""
    recorder = _HeadContributions(adapter).run(batches)
    empty_long = torch.zeros(0, dtype=torch.long)
    return {
        "output_norm": [s if a else _empty() for s, a in zip(recorder.sums, recorder.attention)],
        "usage_top1": [t.to(torch.float64) if a else _empty() for t, a in zip(recorder.top1, recorder.attention)],
        "example_top1": [torch.cat(e) if a and e else empty_long for e, a in zip(recorder.example_top1, recorder.attention)],
    }


class WeightNormScore:
    """``‖W_V,h‖_F · ‖W_O,h‖_F`` (data-free; ``batches`` is ignored)."""

    name = "weight_norm"

    def score(self, adapter, batches=None) -> list[torch.Tensor]:
        scores = []
        for i in range(adapter.num_layers):
            if not adapter.has_attention(i):
                scores.append(_empty())
                continue
            wv, wo = _head_slices(adapter, i)
            scores.append((wv.flatten(1).norm(dim=1) * wo.flatten(1).norm(dim=1)).cpu())
        return scores


class OutputNormScore:
    """``Σ_t ‖W_O,h E_h[t]‖₂`` over every counted token of every batch (float64)."""

    name = "output_norm"

    def score(self, adapter, batches: list[dict]) -> list[torch.Tensor]:
        return head_contribution_stats(adapter, batches)["output_norm"]


class UsageTop1Score:
    """Tokens at which head h has the largest ``‖W_O,h E_h[t]‖`` in its layer (ties: lowest index),
    as float64; per layer the counts sum to the number of counted tokens."""

    name = "usage_top1"

    def score(self, adapter, batches: list[dict]) -> list[torch.Tensor]:
        return head_contribution_stats(adapter, batches)["usage_top1"]


def example_top1_heads(adapter, batches: list[dict]) -> list[torch.Tensor]:
    """Per layer, int64 [examples]: for each calibration example (in batch order), the head whose
    contribution ``Σ_t ‖W_O,h E_h[t]‖`` summed over the example's counted tokens is largest (ties:
    lowest index); an empty tensor for a layer without attention."""
    return head_contribution_stats(adapter, batches)["example_top1"]


def example_usage_top1(adapter, batches: list[dict]) -> list[torch.Tensor]:
    """Per layer, int64 [heads_l]: how many calibration examples have head h as their top head (see
    `example_top1_heads`): "which heads carry each example". Sums to the number of examples."""
    return count_wins(example_top1_heads(adapter, batches), [w.heads for w in adapter.all_widths()])


def count_wins(example_top1: list[torch.Tensor], heads: list[int]) -> list[torch.Tensor]:
    """Per layer, int64 [heads_l]: how often each head is an example's top head."""
    return [torch.bincount(top, minlength=n) if n else torch.zeros(0, dtype=torch.long)
            for top, n in zip(example_top1, heads)]


# ------------------------------------------------------------------------------------ Michel Taylor
class TaylorGateScore:
    """Michel et al.: ``I_h = Σ_batches |dL/dξ_h| / tokens`` at ξ = 1, with ξ the `HeadGates`.

    ``loss="contrastive"`` is `contrastive_loss` (label-free in-batch InfoNCE at ``temperature``);
    ``loss_fn(model, batch) -> scalar`` replaces it (e.g. a task loss with labels). The absolute value
    is taken per batch, before accumulating; ``tokens`` is the number of counted tokens (text: the
    attention mask's sum; image: batch × sequence). Parameters get no gradient (requires_grad is off
    while scoring and restored after). One forward + backward per batch (two forwards for images)."""

    name = "taylor_gate"

    def __init__(self, loss: str = "contrastive", temperature: float = 0.05,
                 loss_fn: Callable[[nn.Module, dict], torch.Tensor] | None = None):
        if loss_fn is None and loss != "contrastive":
            raise CompressError(f"taylor_gate: unknown loss {loss!r} (contrastive, or pass loss_fn)")
        self.loss = loss
        self.temperature = float(temperature)
        self.loss_fn = loss_fn

    def _loss(self, adapter, batch: dict) -> torch.Tensor:
        if self.loss_fn is not None:
            return self.loss_fn(adapter.model, batch)
        return contrastive_loss(adapter, batch, self.temperature)

    def score(self, adapter, batches: list[dict]) -> list[torch.Tensor]:
        model = adapter.model
        device = _device(model)
        widths = adapter.all_widths()
        totals = [torch.zeros(w.heads, dtype=torch.float64) for w in widths]
        tokens = 0
        with _scoring_mode(model, freeze=True), HeadGates(adapter, requires_grad=True) as gates:
            for batch in batches:
                batch = _to_device(batch, device)
                gates.zero_grad()
                with torch.enable_grad():
                    loss = self._loss(adapter, batch)
                    if loss.requires_grad:  # False only when no layer has attention left
                        loss.backward()
                for total, grad in zip(totals, gates.grads()):
                    total += grad.abs()
                mask = token_mask(batch)
                tokens += int(mask.sum()) if mask is not None else gates.last_token_count
            gates.zero_grad()
        return [t / max(tokens, 1) if w.heads else _empty() for t, w in zip(totals, widths)]


# ------------------------------------------------------------------------------------ ablation
class _StopForward(Exception):
    """Raised by a layer's forward hook once the layer of interest has run."""


def _layer_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


class AblationScore:
    """Exact leave-one-out: ``Σ_t ‖Z_l[t] - Z_l,-h[t]‖²`` over counted tokens, where ``Z_l`` is layer
    l's output (its forward's hidden states) with every head and ``Z_l,-h`` the same with head h's
    gate at 0 (the model's other layers untouched).

    Cost per batch: one full forward, then one forward per (layer, head) that stops right after
    layer l (a forward hook raises), i.e. about ``Σ_l H·(l+1)/L ≈ H·L/2`` full forwards — fine for
    small encoders; an exact but slow reference for large ones."""

    name = "ablation"

    def score(self, adapter, batches: list[dict]) -> list[torch.Tensor]:
        model = adapter.model
        device = _device(model)
        widths = adapter.all_widths()
        totals = [torch.zeros(w.heads, dtype=torch.float64) for w in widths]
        layers = [i for i, w in enumerate(widths) if w.heads]
        captured: dict[int, torch.Tensor] = {}

        def capture(layer_index: int, stop: bool):
            def hook(module, args, output):
                captured[layer_index] = _layer_output(output).detach()
                if stop:
                    raise _StopForward
            return hook

        with _scoring_mode(model), torch.no_grad(), HeadGates(adapter) as gates:
            for batch in batches:
                batch = _to_device(batch, device)
                mask = token_mask(batch)
                captured.clear()
                handles = [adapter.layers[i].register_forward_hook(capture(i, False)) for i in layers]
                try:
                    model(**batch)
                finally:
                    for handle in handles:
                        handle.remove()
                reference = {i: captured[i][_mask_for(mask, captured[i])].to(torch.float64) for i in layers}
                for i in layers:
                    handle = adapter.layers[i].register_forward_hook(capture(i, True))
                    try:
                        for h in range(widths[i].heads):
                            gates.reset()
                            values = torch.ones(widths[i].heads)
                            values[h] = 0
                            gates.set(i, values)
                            try:
                                model(**batch)
                            except _StopForward:
                                pass
                            ablated = captured[i][_mask_for(mask, captured[i])].to(torch.float64)
                            totals[i][h] += (ablated - reference[i]).square().sum().cpu()
                    finally:
                        handle.remove()
                        gates.reset()
        return [t if w.heads else _empty() for t, w in zip(totals, widths)]


# ------------------------------------------------------------------------------------ FFN channels
class ChannelWeightNormScore:
    """``‖W_up[c, :]‖ · ‖W_down[:, c]‖`` (data-free)."""

    name = "weight_norm"

    def score(self, adapter, batches=None) -> list[torch.Tensor]:
        scores = []
        for i in range(adapter.num_layers):
            up = adapter.linear(i, "up").weight.detach().to(torch.float64)
            down = adapter.linear(i, "down").weight.detach().to(torch.float64)
            scores.append((up.norm(dim=1) * down.norm(dim=0)).cpu())
        return scores


class ChannelOutputNormScore:
    """``Σ_t |a_c(t)| · ‖W_down[:, c]‖``: a_c is the activated channel (the down projection's input)."""

    name = "output_norm"

    def score(self, adapter, batches: list[dict]) -> list[torch.Tensor]:
        model = adapter.model
        device = _device(model)
        widths = adapter.all_widths()
        sums = [torch.zeros(w.intermediate, dtype=torch.float64) for w in widths]
        state: dict[str, torch.Tensor | None] = {"mask": None}

        def record(layer_index: int):
            def hook(module, args):
                x = args[0].detach()
                sums[layer_index] += x[_mask_for(state["mask"], x)].abs().sum(dim=0, dtype=torch.float64).cpu()
            return hook

        handles = []
        try:
            for i in range(adapter.num_layers):
                handles.append(adapter.ffn_consumer(i).register_forward_pre_hook(record(i)))
            with _scoring_mode(model), torch.no_grad():
                for batch in batches:
                    batch = _to_device(batch, device)
                    state["mask"] = token_mask(batch)
                    model(**batch)
        finally:
            for handle in handles:
                handle.remove()
        return [s * adapter.linear(i, "down").weight.detach().to("cpu", torch.float64).norm(dim=0)
                for i, s in enumerate(sums)]


# ------------------------------------------------------------------------------------ normalisation
def normalise_michel(scores: list[torch.Tensor]) -> list[torch.Tensor]:
    """bertology's defaults: divide each layer's vector by its L2 norm (+1e-20), then min-max all
    layers together to [0, 1]. Empty layers stay empty; if every score is equal the result is 0."""
    scaled = [s.to(torch.float64) / (s.to(torch.float64).norm() + 1e-20) if s.numel() else _empty() for s in scores]
    values = torch.cat([s for s in scaled if s.numel()]) if any(s.numel() for s in scaled) else _empty()
    if values.numel() == 0:
        return scaled
    low, high = values.min(), values.max()
    if high == low:
        return [torch.zeros_like(s) for s in scaled]
    return [(s - low) / (high - low) for s in scaled]


HEAD_SCORES = {
    "taylor_gate": TaylorGateScore,
    "output_norm": OutputNormScore,
    "usage_top1": UsageTop1Score,
    "ablation": AblationScore,
    "weight_norm": WeightNormScore,
}

CHANNEL_SCORES = {
    "output_norm": ChannelOutputNormScore,
    "weight_norm": ChannelWeightNormScore,
}
