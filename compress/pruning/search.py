"""Search-based global sparsity allocation, after Týr-the-Pruner (Li et al., 2025), sized for a CPU.

The scorer ranks units inside each layer; this allocator decides how many each sublayer (the
attention and the MLP of every layer) keeps under one parameter budget by searching instead of
ranking once. It starts from the global allocation and repeatedly moves budget between two
sublayers (one grows by a step, the other shrinks by the same number of parameters), keeping a
move when the KL divergence of the dense model's next-token distributions from the candidate's
falls on held-out calibration windows. Steps shrink over rounds (coarse to fine).

Candidates are evaluated on the dense model through masks: zeroing the removed units' inputs of
o_proj / down_proj and adding the removed units' mean output as a bias is exactly the sliced model
with FLAP's compensation, without copying weights. Each evaluation reruns the blocks from the first
layer a move changed, from cached hidden states; the dense log-probabilities are computed once.
Unlike the published method, candidates are not refitted per move and the supernet is implicit
(one ranking per layer); the refit of the configured compensation runs once on the final widths.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from compress.calibration.runner import capture_block_inputs
from compress.progress import progress_bar
from compress.pruning.units import LayerUnits

KL_CHUNK = 256  # positions per log-softmax chunk


@dataclass(frozen=True)
class SearchSettings:
    """``evaluations``: candidate allocations tried in all; ``steps``: the MLP step of each round
    as a fraction of a layer's channels (an attention step is one unit, or as many as match the
    other side's parameters); ``seed``: which moves are proposed."""

    evaluations: int = 240
    steps: tuple[float, ...] = (1 / 8, 1 / 16, 1 / 32)
    seed: int = 0


@dataclass
class SearchResult:
    counts: list[tuple[int, int]]
    start_kl: float
    final_kl: float
    evaluations: int
    accepted: int
    history: list[float] = field(default_factory=list)  # KL after each accepted move

    def details(self) -> dict:
        return {"search_start_kl": self.start_kl, "search_final_kl": self.final_kl,
                "search_evaluations": self.evaluations, "search_accepted": self.accepted}


class MaskedAllocation:
    """Applies keep counts to the dense model through masks on the consumers' inputs (and, with
    ``compensate``, the removed units' mean output as a bias). Call :meth:`remove` when done."""

    def __init__(self, adapter, layers: list[LayerUnits], stats: list, compensate: bool):
        self.adapter, self.layers, self.stats, self.compensate = adapter, layers, stats, compensate
        self.current: list[list] = [[None, None] for _ in layers]  # per layer: (mask, bias) of attn and mlp
        self._cache: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.handles = []
        for i in range(len(layers)):
            for slot, consumer in ((0, adapter.attention_consumer(i)), (1, adapter.mlp_consumer(i))):
                self.handles.append(consumer.register_forward_pre_hook(self._pre_hook(i, slot)))
                self.handles.append(consumer.register_forward_hook(self._post_hook(i, slot)))

    def _pre_hook(self, i: int, slot: int):
        def hook(_module, args):
            mask = self.current[i][slot]
            return None if mask is None else (args[0] * mask[0],)
        return hook

    def _post_hook(self, i: int, slot: int):
        def hook(_module, _args, output):
            mask = self.current[i][slot]
            return output if mask is None or mask[1] is None else output + mask[1]
        return hook

    def _channels(self, i: int, slot: int, count: int) -> torch.Tensor:
        units = self.layers[i].attn if slot == 0 else self.layers[i].mlp
        kept = units.kept_units(count)
        if slot == 1:
            return torch.tensor(kept, dtype=torch.long)
        d = self.adapter.head_dim
        heads = sorted(h for k in kept for h in units.members[k])
        return torch.tensor([h * d + j for h in heads for j in range(d)], dtype=torch.long)

    def mask(self, i: int, slot: int, count: int):
        """(input mask [in], bias [out] or None) of sublayer ``slot`` of layer ``i`` keeping ``count``
        units; None when it keeps every unit."""
        units = self.layers[i].attn if slot == 0 else self.layers[i].mlp
        if count >= units.size:
            return None
        key = (i, slot, count)
        if key not in self._cache:
            consumer = self.adapter.attention_consumer(i) if slot == 0 else self.adapter.mlp_consumer(i)
            keep = self._channels(i, slot, count).to(consumer.weight.device)
            mask = torch.zeros(consumer.in_features, dtype=consumer.weight.dtype, device=consumer.weight.device)
            mask[keep] = 1
            bias = None
            if self.compensate:
                stats = self.stats[i].attn if slot == 0 else self.stats[i].mlp
                removed = (mask == 0).to(torch.float64)
                mean = stats.mean.to(device=consumer.weight.device)
                bias = (consumer.weight.detach().to(torch.float64) @ (mean * removed)).to(consumer.weight.dtype)
            self._cache[key] = (mask, bias)
        return self._cache[key]

    def set(self, counts: list[tuple[int, int]]) -> None:
        for i, (a, m) in enumerate(counts):
            self.current[i] = [self.mask(i, 0, a), self.mask(i, 1, m)]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


class KLFitness:
    """KL(dense || candidate) per token on fixed windows, rerunning only the blocks a move changed."""

    def __init__(self, adapter, masked: MaskedAllocation, windows: torch.Tensor, batch_size: int = 8):
        self.adapter, self.masked = adapter, masked
        device = next(adapter.model.parameters()).device
        batches = [{"input_ids": b.to(device)} for b in windows.split(batch_size)]
        captured = list(capture_block_inputs(adapter, batches))
        self.kwargs = [kwargs for _, kwargs in captured]
        self.inputs = [hidden for hidden, _ in captured]
        self.positions = windows.shape[0] * windows.shape[1]
        masked.set([(lu.attn.size, lu.mlp.size) for lu in masked.layers])  # dense: no masks
        dense_hidden = self._run_from(0, [self.inputs])[-1]
        self.dense_logp = [self._log_probs(h).to(torch.float16) for h in dense_hidden]  # half the memory
        self.hidden: list[list[torch.Tensor]] = []  # per layer: inputs (per batch) under the accepted counts

    @torch.no_grad()
    def _run_from(self, start: int, prefix: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
        """Inputs of layers start..L-1 and the final output, starting from ``prefix[-1]`` (inputs of ``start``)."""
        states = [prefix[-1]]
        for i in range(start, self.adapter.num_layers):
            block = self.adapter.layers[i]
            outs = []
            for hidden, kwargs in zip(states[-1], self.kwargs):
                out = block(hidden, **kwargs.layer(i))
                outs.append(out[0] if isinstance(out, tuple) else out)
            states.append(outs)
        return states

    @torch.no_grad()
    def _log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.adapter.model.get_output_embeddings()(self.adapter.decoder.norm(hidden))
        return F.log_softmax(logits.float(), dim=-1).reshape(-1, logits.shape[-1])

    @torch.no_grad()
    def _kl(self, final: list[torch.Tensor]) -> float:
        total = 0.0
        for hidden, dense in zip(final, self.dense_logp):
            normed = self.adapter.decoder.norm(hidden).reshape(-1, hidden.shape[-1])
            head = self.adapter.model.get_output_embeddings()
            for start in range(0, normed.shape[0], KL_CHUNK):
                part = slice(start, start + KL_CHUNK)
                logp = F.log_softmax(head(normed[part]).float(), dim=-1)
                reference = dense[part].float()
                total += float((reference.exp() * (reference - logp)).sum(dtype=torch.float64))
        return total / self.positions

    def evaluate(self, counts: list[tuple[int, int]], first_changed: int = 0) -> tuple[float, list]:
        """(KL of ``counts``, the layer inputs from ``first_changed`` on, for :meth:`accept`)."""
        self.masked.set(counts)
        prefix = [self.inputs] if first_changed == 0 or not self.hidden else [self.hidden[first_changed]]
        states = self._run_from(first_changed, prefix)
        return self._kl(states[-1]), states

    def accept(self, first_changed: int, states: list) -> None:
        """Keep the layer inputs computed by :meth:`evaluate` for the accepted counts."""
        if not self.hidden:
            self.hidden = states[:-1]
        else:
            self.hidden[first_changed:] = states[:-1]


def _step_units(units, frac: float) -> int:
    return 1 if units.kind == "attn" else max(1, round(frac * units.size))


def propose(layers: list[LayerUnits], counts: list[list[int]], rng: random.Random, frac: float):
    """A budget-neutral move: (new counts, first changed layer) or None when out of bounds."""
    sublayers = [(i, s) for i, lu in enumerate(layers) for s, u in enumerate((lu.attn, lu.mlp))
                 if u.min_keep < u.size]
    if len(sublayers) < 2:
        return None
    (gi, gs), (si, ss) = rng.sample(sublayers, 2)
    grow = layers[gi].attn if gs == 0 else layers[gi].mlp
    shrink = layers[si].attn if ss == 0 else layers[si].mlp
    params = max(_step_units(grow, frac) * grow.cost, _step_units(shrink, frac) * shrink.cost)
    up, down = max(1, round(params / grow.cost)), max(1, round(params / shrink.cost))
    new = [list(c) for c in counts]
    new[gi][gs] += up
    new[si][ss] -= down
    if new[gi][gs] > grow.size or new[si][ss] < min(shrink.min_keep, shrink.size):
        return None
    return new, min(gi, si)


def search_allocation(adapter, layers: list[LayerUnits], stats: list, start: list[tuple[int, int]],
                      windows: torch.Tensor, settings: SearchSettings, compensate: bool = True,
                      batch_size: int = 8, progress: bool = True) -> SearchResult:
    """Refine the keep counts ``start`` by budget-neutral moves that lower the KL on ``windows``."""
    masked = MaskedAllocation(adapter, layers, stats, compensate)
    try:
        fitness = KLFitness(adapter, masked, windows, batch_size)
        counts = [list(c) for c in start]
        best, states = fitness.evaluate([tuple(c) for c in counts])
        fitness.accept(0, states)
        result = SearchResult(counts=[tuple(c) for c in counts], start_kl=best, final_kl=best, evaluations=1,
                              accepted=0, history=[best])
        rng = random.Random(settings.seed)
        per_round = max(1, (settings.evaluations - 1) // len(settings.steps))
        rounds = [frac for frac in settings.steps for _ in range(per_round)]
        for frac in progress_bar(rounds, "searching the allocation", enabled=progress):
            move = None
            for _ in range(20):  # a few draws until a move is within bounds
                move = propose(layers, counts, rng, frac)
                if move is not None:
                    break
            if move is None:
                continue
            candidate, first = move
            kl, states = fitness.evaluate([tuple(c) for c in candidate], first)
            result.evaluations += 1
            if kl < best:
                best, counts = kl, candidate
                fitness.accept(first, states)
                result.accepted += 1
                result.history.append(kl)
            else:
                masked.set([tuple(c) for c in counts])
        result.counts, result.final_kl = [tuple(c) for c in counts], best
        return result
    finally:
        masked.remove()
