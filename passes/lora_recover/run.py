"""lora_recover: recovery fine-tuning of a pruned model with LoRA, merged back into the weights.

The pass's name, options and docs are declared in :mod:`passes.lora_recover`; this is what runs it.
"""

from __future__ import annotations

import math
from dataclasses import replace

from compress.plan import PlanStep
from passes._common import target_names, training_ids
from passes.lora_recover import LoraRecover

ARTIFACT = "lora_recover"


def block_ranks(importance: list[float], rank: int) -> list[int]:
    """Per-block LoRA ranks proportional to ``importance``, each at least 1, summing to
    ``rank · len(importance)`` (so the mean is ``rank``); a more important block never gets a
    smaller rank than a less important one.

    Blocks whose proportional share falls below 1 are fixed at 1 and the rest of the budget is
    shared again among the others (water-filling); the shares are then rounded by largest remainder.
    """
    n = len(importance)
    if n == 0:
        return []
    budget = rank * n
    weights = [max(float(w), 0.0) for w in importance]
    if sum(weights) <= 0.0:
        weights = [1.0] * n
    fixed: set[int] = set()
    while True:
        free = [i for i in range(n) if i not in fixed]
        remaining = budget - len(fixed)
        total = sum(weights[i] for i in free)
        shares = {i: (remaining * weights[i] / total if total > 0 else remaining / len(free)) for i in free}
        low = {i for i, s in shares.items() if s < 1.0}
        if not low or len(low) == len(free):
            break
        fixed |= low
    ranks = [1] * n
    for i, s in shares.items():
        ranks[i] = max(1, math.floor(s))
    leftover = budget - sum(ranks)
    by_remainder = sorted(shares, key=lambda i: (-(shares[i] - math.floor(shares[i])), -weights[i], i))
    for i in by_remainder[: max(leftover, 0)]:
        ranks[i] += 1
    return ranks


class LoraRecoverPass(LoraRecover):
    """Runs the ``lora_recover`` pass (declared by :class:`passes.lora_recover.LoraRecover`)."""

    def __init__(self, options: "LoraRecoverPass.Options"):
        self.options = options

    # ------------------------------------------------------------------------------- parts
    def block_importance(self, ctx, ids) -> list[float]:
        from compress.calibration.sources import random_windows, window_bos
        from compress.pruning.block_importance import measure_block_importance

        o = self.options
        windows = random_windows(ids, o.importance_samples, o.seqlen, o.seed, source=o.source,
                                 field=f"passes.{self.name}", bos=window_bos(ctx.tokenizer))
        return measure_block_importance(ctx.adapter(), windows, batch_size=ctx.batch_size, metric="angular",
                                        progress=ctx.progress)

    # -------------------------------------------------------------------------------- run
    def run(self, ctx) -> PlanStep:
        from compress.calibration.sources import window_bos
        from compress.training import LoRASpec, merge_lora, model_state_digest, run_fingerprint, train_lora

        o = self.options
        names = target_names(ctx, o.target_modules)
        ids = training_ids(ctx, o.source, self.name, parts=bool(o.balance))
        details: dict = {}
        rank_pattern: dict[str, int] = {}
        if o.rank_by == "block_importance":
            importance = self.block_importance(ctx, training_ids(ctx, o.source, self.name) if o.balance else ids)
            ranks = block_ranks(importance, o.rank)
            rank_pattern = {name: r for layer, r in zip(names, ranks) for name in layer}
            details["block_importance"] = [float(x) for x in importance]
        else:
            ranks = [o.rank] * len(names)
        details["lora_ranks"] = ranks

        lora = LoRASpec(target_modules=tuple(n for layer in names for n in layer), rank=o.rank, alpha=o.alpha,
                        dropout=o.dropout, rank_pattern=rank_pattern)
        train = replace(o.train_spec(), bos=window_bos(ctx.tokenizer))
        teacher = ctx.dense_model() if o.loss == "kl" else None
        extra = {"teacher": model_state_digest(teacher)} if teacher is not None else None
        fingerprint = run_fingerprint(ctx.model, ids, lora, train, extra)
        result = train_lora(ctx.model, ids, lora, train, checkpoint_dir=o.checkpoint_folder(fingerprint),
                            checkpoint_every=o.checkpoint_every, fingerprint=fingerprint, progress=ctx.progress,
                            description="LoRA recovery" + (" (distillation)" if teacher is not None else ""),
                            teacher=teacher)
        factors = merge_lora(ctx.model)
        details.update({**result.summary(), "adapted_modules": len(result.modules)})
        return PlanStep(self.name, o.model_dump(), layers=[], artifacts={ARTIFACT: factors}, details=details)

    @staticmethod
    def replay(model, step: PlanStep) -> None:
        """``compress apply``: add the saved ``scaling · B @ A`` to each weight, as the merge did."""
        from compress.errors import PlanError
        from compress.training import apply_lora_factors

        if ARTIFACT not in step.artifacts:
            raise PlanError(f"the lora_recover step has no {ARTIFACT!r} artifact (the LoRA factors)")
        apply_lora_factors(model, step.artifacts[ARTIFACT])
