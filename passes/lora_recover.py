"""lora_recover: recovery fine-tuning of a pruned model with LoRA, merged back into the weights."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

from compress.plan import PlanStep
from compress.recipe import TextSource
from compress.registry import register_pass
from compress.training import DEFAULT_TARGET_ROLES

ARTIFACT = "lora_recover"
TargetRole = Literal["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


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


@register_pass("lora_recover")
class LoraRecoverPass:
    """LoRA recovery fine-tuning: train low-rank adapters on text, then merge them into the weights.

    Attaches peft LoRA to the decoder linears of the (pruned) model, trains it with AdamW on random
    windows of a text source, and adds ``scaling · B @ A`` to each weight, so the model stays a plain
    model. The factors are saved beside plan.json, so ``compress apply`` reproduces the weights.
    """

    needs_calibration = False

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")

        steps: int = Field(200, ge=1, description="Optimizer steps.")
        lr: float = Field(2e-4, gt=0.0, description="AdamW learning rate (after warm-up).")
        rank: int = Field(8, ge=1, description="LoRA rank (the mean rank with rank_by: block_importance).")
        alpha: float = Field(16.0, gt=0.0, description="LoRA alpha; the scaling of an adapter is alpha / its rank.")
        dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapter input while training.")
        batch_size: int = Field(4, ge=1, description="Windows per micro-batch.")
        seqlen: int = Field(128, ge=2, description="Tokens per training window.")
        grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step (gradient accumulation).")
        warmup_steps: float = Field(
            10, ge=0.0, description="Linear warm-up: a number of steps, or a fraction of `steps` when below 1."
        )
        source: TextSource = Field("austen", description="Training text source (default: the calibration split).")
        seed: int = Field(0, description="Seeds the adapter initialisation, dropout and the window draws.")
        target_modules: list[TargetRole] = Field(
            default_factory=lambda: list(DEFAULT_TARGET_ROLES),
            min_length=1,
            description="Decoder linears that get adapters (q/k/v/o_proj, gate/up/down_proj).",
        )
        checkpoint_every: int = Field(50, ge=0, description="Checkpoint every this many steps (0: only at the end).")
        checkpoint_dir: Optional[str] = Field(
            None,
            description="Checkpoint folder; default <cache>/checkpoints/<hash of model weights, text and options> "
            "with <cache> = $COMPRESS_CACHE or ~/.cache/compress. A restarted identical run resumes from it.",
        )
        rank_by: Literal["none", "block_importance"] = Field(
            "none",
            description="'block_importance': each block's rank proportional to its angular block importance "
            "(CFSP coarse-to-fine), mean rank = rank, each at least 1.",
        )
        importance_samples: int = Field(32, ge=1, description="Windows measured for rank_by: block_importance.")

        @field_validator("warmup_steps")
        @classmethod
        def _whole_or_fraction(cls, value: float) -> float:
            if value >= 1 and value != int(value):
                raise ValueError(f"must be a whole number of steps or a fraction below 1 (got {value})")
            return value

        @field_validator("target_modules")
        @classmethod
        def _unique(cls, value: list[str]) -> list[str]:
            if len(set(value)) != len(value):
                raise ValueError(f"lists a module twice (got {value})")
            return value

        def warmup(self) -> int:
            """The warm-up in optimizer steps."""
            if 0 < self.warmup_steps < 1:
                return int(round(self.warmup_steps * self.steps))
            return int(self.warmup_steps)

    def __init__(self, options: "LoraRecoverPass.Options"):
        self.options = options

    # ------------------------------------------------------------------------------- parts
    def target_names(self, ctx) -> list[list[str]]:
        """Per layer, the module names (in ``ctx.model``) of the target linears, from the adapter."""
        from compress.training import module_names

        adapter = ctx.adapter()
        per_layer = []
        for i in range(adapter.num_layers):
            linears = {**adapter.attention_linears(i), **adapter.mlp_linears(i)}
            per_layer.append(module_names(ctx.model, [linears[role] for role in self.options.target_modules]))
        return per_layer

    def token_ids(self, ctx):
        from compress.calibration.sources import read_text, tokenize_text
        from compress.errors import CompressError

        if ctx.tokenizer is None:
            raise CompressError("lora_recover needs the model's tokenizer to read its text source")
        return tokenize_text(ctx.tokenizer, read_text(self.options.source))

    def block_importance(self, ctx, ids) -> list[float]:
        from compress.calibration.sources import random_windows
        from compress.pruning.block_importance import measure_block_importance

        o = self.options
        windows = random_windows(ids, o.importance_samples, o.seqlen, o.seed, source=o.source)
        return measure_block_importance(ctx.adapter(), windows, batch_size=ctx.batch_size, metric="angular",
                                        progress=ctx.progress)

    def checkpoint_dir(self, fingerprint: str) -> Path:
        if self.options.checkpoint_dir:
            return Path(self.options.checkpoint_dir).expanduser()
        from compress.models.loading import cache_root

        return cache_root() / "checkpoints" / fingerprint

    # -------------------------------------------------------------------------------- run
    def run(self, ctx) -> PlanStep:
        from compress.training import LoRASpec, TrainSpec, merge_lora, run_fingerprint, train_lora

        o = self.options
        names = self.target_names(ctx)
        ids = self.token_ids(ctx)
        details: dict = {}
        rank_pattern: dict[str, int] = {}
        if o.rank_by == "block_importance":
            importance = self.block_importance(ctx, ids)
            ranks = block_ranks(importance, o.rank)
            rank_pattern = {name: r for layer, r in zip(names, ranks) for name in layer}
            details["block_importance"] = [float(x) for x in importance]
        else:
            ranks = [o.rank] * len(names)
        details["lora_ranks"] = ranks

        lora = LoRASpec(target_modules=tuple(n for layer in names for n in layer), rank=o.rank, alpha=o.alpha,
                        dropout=o.dropout, rank_pattern=rank_pattern)
        train = TrainSpec(steps=o.steps, lr=o.lr, batch_size=o.batch_size, seqlen=o.seqlen, grad_accum=o.grad_accum,
                          warmup_steps=o.warmup(), seed=o.seed)
        fingerprint = run_fingerprint(ctx.model, ids, lora, train)
        result = train_lora(ctx.model, ids, lora, train, checkpoint_dir=self.checkpoint_dir(fingerprint),
                            checkpoint_every=o.checkpoint_every, fingerprint=fingerprint, progress=ctx.progress,
                            description="LoRA recovery")
        factors = merge_lora(ctx.model)
        head, tail = result.losses[:10], result.losses[-10:]
        details.update({
            "trainable_params": result.trainable_params,
            "adapted_modules": len(result.modules),
            "resumed_from_step": result.resumed_from,
            "loss_first_steps": sum(head) / len(head),
            "loss_last_steps": sum(tail) / len(tail),
        })
        return PlanStep(self.name, o.model_dump(), layers=[], artifacts={ARTIFACT: factors}, details=details)

    @staticmethod
    def replay(model, step: PlanStep) -> None:
        """``compress apply``: add the saved ``scaling · B @ A`` to each weight, as the merge did."""
        from compress.errors import PlanError
        from compress.training import apply_lora_factors

        if ARTIFACT not in step.artifacts:
            raise PlanError(f"the lora_recover step has no {ARTIFACT!r} artifact (the LoRA factors)")
        apply_lora_factors(model, step.artifacts[ARTIFACT])
