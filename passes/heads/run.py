"""heads: remove whole attention heads (and optionally FFN channels) of an encoder.

Scorer ► selection ► plan ► surgeon, as for the decoder passes, on BERT / MiniLM, ViT / DeiT /
DINOv2 and CLIP towers (see docs/heads.md). transformers 5 has no `prune_heads` or `head_mask`
any more: masking goes through our own gates on the o projection's input
(`compress.pruning.head_gates`), slicing through `compress.pruning.encoder_surgeon`.

The pass's name, options and docs are declared in :mod:`passes.heads`; this is what runs it.
"""

from __future__ import annotations

import torch

from compress.errors import CompressError
from compress.plan import LayerPlan, PlanStep
from passes.heads import Heads

HEAD_SCORE_NAMES = ("taylor_gate", "output_norm", "usage_top1", "ablation", "weight_norm")


def select_heads(scores: list[torch.Tensor], remove: int, allocator: str, floor: int,
                 masked: list[set[int]] | None = None) -> list[set[int]]:
    """Per layer, the heads to remove: ``remove`` more than ``masked`` (already removed) in all.

    ``scores`` per layer [heads_l] (higher = more important). 'uniform' spreads the removals over
    the layers in proportion to their head counts (largest remainders first, then layer order);
    'global' ranks every head of every layer together. A layer never drops below ``floor`` heads.
    Ties break by (score, layer, head), so the result is deterministic."""
    masked = [set(m) for m in (masked or [set() for _ in scores])]
    sizes = [len(s) for s in scores]
    room = [max(0, n - floor - len(m)) for n, m in zip(sizes, masked)]
    remove = min(remove, sum(room))
    candidates = [[(float(s[h]), layer, h) for h in range(len(s)) if h not in masked[layer]]
                  for layer, s in enumerate(scores)]
    for c in candidates:
        c.sort()
    if allocator == "uniform":
        total = sum(len(c) for c in candidates)
        shares = [remove * len(c) / total if total else 0.0 for c in candidates]
        counts = [min(int(share), r) for share, r in zip(shares, room)]
        order = sorted(range(len(scores)), key=lambda i: (-(shares[i] - int(shares[i])), i))
        while sum(counts) < remove:
            grew = False
            for i in order:
                if sum(counts) < remove and counts[i] < room[i]:
                    counts[i] += 1
                    grew = True
            if not grew:
                break
        for layer, count in enumerate(counts):
            masked[layer] |= {h for _, _, h in candidates[layer][:count]}
        return masked
    pool = sorted(x for c in candidates for x in c)
    taken = [0] * len(scores)
    removed = 0
    for _, layer, head in pool:
        if removed >= remove:
            break
        if taken[layer] < room[layer]:
            masked[layer].add(head)
            taken[layer] += 1
            removed += 1
    return masked


@torch.no_grad()
def removed_head_means(adapter, batches, removed: list[set[int]]) -> list[torch.Tensor | None]:
    """Per layer, [hidden] float64: the mean over calibration tokens of what the removed heads add
    to the output projection, ``Σ_{h removed} W_O,h · mean_t E_h[t]`` (None where nothing is removed).

    The hook runs before any head gate, so it sees each head's own output in the model as it
    currently runs (with the other removed heads gated off); text tokens outside the attention mask
    do not count."""
    from compress.pruning.head_scores import token_mask

    d = adapter.head_dim
    sums: dict[int, torch.Tensor] = {}
    tokens: dict[int, int] = {}
    state: dict = {}

    def hook(index):
        def record(module, args):
            x = args[0].detach().double()  # [B, T, H·D]
            mask = state["mask"]
            if mask is not None:
                x = x * mask.to(x.device, x.dtype).unsqueeze(-1)
            sums[index] = sums.get(index, 0) + x.reshape(-1, x.shape[-1]).sum(0).cpu()
            tokens[index] = tokens.get(index, 0) + (int(mask.sum()) if mask is not None else x.shape[0] * x.shape[1])
        return record

    handles = [adapter.attention_consumer(i).register_forward_pre_hook(hook(i), prepend=True)
               for i, gone in enumerate(removed) if gone and adapter.has_attention(i)]
    device = next(adapter.model.parameters()).device
    try:
        for batch in batches:
            inputs = {k: v.to(device) for k, v in batch.items()}
            state["mask"] = token_mask(inputs)
            adapter.model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    means: list[torch.Tensor | None] = []
    for i, gone in enumerate(removed):
        if i not in sums:
            means.append(None)
            continue
        mean = sums[i] / max(tokens[i], 1)  # [H·D]
        cols = torch.cat([torch.arange(h * d, (h + 1) * d) for h in sorted(gone)])
        weight = adapter.attention_consumer(i).weight.detach().double().cpu()  # [hidden, H·D]
        means.append(weight[:, cols] @ mean[cols])
    return means


def select_channels(scores: list[torch.Tensor], ratio: float) -> list[list[int]]:
    """Per layer, the FFN channels kept (sorted): the ``1 - ratio`` best of each layer, at least one."""
    kept = []
    for s in scores:
        keep = max(1, round(len(s) * (1 - ratio)))
        order = sorted(range(len(s)), key=lambda c: (-float(s[c]), c))
        kept.append(sorted(order[:keep]))
    return kept


class HeadsPass(Heads):
    """Runs the ``heads`` pass (declared by :class:`passes.heads.Heads`)."""

    def __init__(self, options: "HeadsPass.Options"):
        self.options = options

    # ---------------------------------------------------------------------------- scoring
    def head_scores(self, adapter, batches) -> list[torch.Tensor]:
        """Per layer [heads_l] float64 scores, normalised as the options say."""
        from compress.pruning.head_scores import HEAD_SCORES, normalise_michel

        scores = HEAD_SCORES[self.options.score]().score(adapter, batches)
        return normalise_michel(scores) if self.options.normalize == "michel" else scores

    def channel_scores(self, adapter, batches) -> list[torch.Tensor]:
        from compress.pruning.head_scores import CHANNEL_SCORES

        return CHANNEL_SCORES[self.options.ffn_score]().score(adapter, batches)

    # ---------------------------------------------------------------------------- removal
    def remove_heads(self, ctx, adapter, batches):
        """(removed heads per layer, the last scores, one record per round, the compensation bias
        [hidden] per layer or None)."""
        from compress.evaluation.embeddings import embedding_agreement, encoder_embeddings
        from compress.pruning.head_gates import HeadGates

        o = self.options
        floor = 0 if o.allow_empty_layers else o.min_heads_per_layer
        sizes = [w.heads for w in adapter.all_widths()]
        budget = round(o.ratio * sum(sizes))
        iterative = o.schedule == "iterative" or o.quality_floor is not None
        per_round = max(1, int(o.step * sum(sizes))) if iterative else budget
        dense = encoder_embeddings(adapter, batches) if o.quality_floor is not None else None
        removed: list[set[int]] = [set() for _ in sizes]
        rounds: list[dict] = []
        scores: list[torch.Tensor] = []
        with HeadGates(adapter) as gates:
            while sum(map(len, removed)) < budget:
                scores = self.head_scores(adapter, batches)
                proposal = select_heads(scores, min(per_round, budget - sum(map(len, removed))), o.allocator, floor, removed)
                if sum(map(len, proposal)) == sum(map(len, removed)):
                    break  # every layer is at its floor
                for layer, heads in enumerate(proposal):
                    gates.set_mask(layer, [h for h in range(sizes[layer]) if h not in heads])
                record = {"round": len(rounds) + 1, "removed": sum(map(len, proposal))}
                if dense is not None:
                    cosine = embedding_agreement(dense, encoder_embeddings(adapter, batches)).mean_cosine
                    record["calibration_cosine"] = cosine
                    if cosine < o.quality_floor:
                        record["kept"] = False
                        rounds.append(record)
                        break
                record["kept"] = True
                rounds.append(record)
                removed = proposal
            for layer, heads in enumerate(removed):  # the final mask (a refused round is undone)
                gates.set_mask(layer, [h for h in range(sizes[layer]) if h not in heads])
            biases = removed_head_means(adapter, batches, removed) if o.compensation == "bias" and batches else None
        return removed, scores, rounds, biases

    def run(self, ctx) -> PlanStep:
        from compress.models.encoder import EncoderAdapter
        from compress.pruning.encoder_surgeon import apply_encoder_step

        o = self.options
        adapter = ctx.adapter()
        if not isinstance(adapter, EncoderAdapter):
            raise CompressError(f"heads prunes encoders (BERT, ViT, DeiT, DINOv2, CLIP towers); got {type(ctx.model).__name__}. "
                                "For decoders use flap, cfsp or loraprune.")
        data_free = (o.score == "weight_norm" and o.quality_floor is None and o.compensation == "none"
                     and (o.ffn_ratio == 0 or o.ffn_score == "weight_norm"))
        batches = [] if data_free else ctx.calibration_batches()
        sizes = [w.heads for w in adapter.all_widths()]
        removed, scores, rounds, biases = self.remove_heads(ctx, adapter, batches)
        kept_channels = select_channels(self.channel_scores(adapter, batches), o.ffn_ratio) if o.ffn_ratio > 0 else None
        layers = []
        for i, n in enumerate(sizes):
            keep_heads = [h for h in range(n) if h not in removed[i]] if removed[i] else None
            keep_channels = kept_channels[i] if kept_channels is not None else None
            bias = LayerPlan.bias_values(biases[i]) if biases is not None and biases[i] is not None else None
            if keep_heads is not None or keep_channels is not None:
                layers.append(LayerPlan(index=i, keep_heads=keep_heads, keep_channels=keep_channels, o_proj_bias=bias))
        step = PlanStep(pass_name=self.name, options=o.model_dump(), layers=layers)
        step.details = {
            "heads_total": sum(sizes),
            "heads_removed": sum(map(len, removed)),
            "empty_layers": [i for i, n in enumerate(sizes) if n and len(removed[i]) == n],
            "kept_heads": [[h for h in range(n) if h not in removed[i]] for i, n in enumerate(sizes)],
            "scores": [[round(float(x), 6) for x in s] for s in scores],
            "rounds": rounds,
        }
        apply_encoder_step(adapter, step)
        return step
