"""LoRAPrune: structured pruning guided by LoRA gradients during fine-tuning (Zhang et al., 2024).

The pass's name, options and docs are declared in :mod:`passes.loraprune`; this is what runs it.
"""

from __future__ import annotations

import torch

from compress.plan import PlanStep
from compress.training import TrainingHooks
from passes._common import target_names, training_ids
from passes.loraprune import LoraPrune

ARTIFACT = "lora"  # the LoRA factors, cut to the kept units and added to the sliced weights


def default_skip_layers(num_layers: int) -> list[int]:
    """The reference's exclusions: the first ``int(0.1·L)`` layers and the last."""
    return sorted(set(range(int(0.1 * num_layers))) | {num_layers - 1})


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman correlation (no tie correction) of two score vectors."""
    ra = torch.argsort(torch.argsort(a)).to(torch.float64)
    rb = torch.argsort(torch.argsort(b)).to(torch.float64)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denominator if denominator else 1.0


class LoraPruneHooks(TrainingHooks):
    """Scores every optimizer step, updates the masks on the schedule, keeps both in checkpoints."""

    def __init__(self, prune_pass: "LoraPrunePass", adapter, skip_layers: set[int]):
        from compress.pruning.lora_importance import SCORERS, UnitImportance, layer_linears
        from compress.pruning.masks import UnitMasks
        from compress.pruning.schedule import PruningSchedule

        o = prune_pass.options
        self.options = o
        self.skip_layers = skip_layers
        # weights and biases of the seven linears (what the unit costs count); read before LoRA is attached
        self.total_params = sum(p.numel() for i in range(adapter.num_layers)
                                for linear in layer_linears(adapter, i).values() for p in linear.parameters())
        self.schedule = PruningSchedule(total=o.steps, final=o.ratio, every=o.prune_every,
                                        warmup=o.prune_warmup, cooldown=o.prune_cooldown)
        self.importance = UnitImportance(adapter, decay=o.ema)
        self.masks = UnitMasks(adapter)
        self.scorer = SCORERS[o.importance]()
        self.history: list[dict] = []
        self.sparsity = 0.0
        self._last_scores: torch.Tensor | None = None

    def on_train_begin(self, model) -> None:
        from compress.models.adapters import get_adapter

        self.adapter = get_adapter(model)
        self.masks.attach(self.adapter)  # before the scorer's hooks: those read the masked inputs
        self.scorer.attach(self.adapter)

    def close(self) -> None:
        self.scorer.detach()
        self.masks.detach()

    def on_pre_optimizer_step(self, model, step: int) -> None:
        self.importance.update(self.scorer.collect())

    def on_step_end(self, model, step: int, loss: float) -> None:
        if self.schedule.updates_at(step):
            self.update_masks(step, self.schedule.ratio(step))

    def update_masks(self, step: int, ratio: float) -> None:
        from compress.pruning.masks import select_units

        o = self.options
        before = self.masks.state_dict()
        keep_heads, keep_channels = select_units(
            self.adapter, self.importance.heads, self.importance.channels, self.masks, ratio, gqa=o.gqa,
            allocator=o.allocator, skip_layers=self.skip_layers, min_heads=o.min_heads, min_channels=o.min_channels,
        )
        newly = restored = 0
        for old, new in zip(before["keep_heads"] + before["keep_channels"], keep_heads + keep_channels):
            newly += int((old & ~new).sum())
            restored += int((~old & new).sum())
        self.masks.load_state_dict({"keep_heads": keep_heads, "keep_channels": keep_channels})
        self.sparsity = self.masks.removed_params(self.adapter, o.gqa) / self.total_params
        scores = self.importance.flat()
        stability = rank_correlation(scores, self._last_scores) if self._last_scores is not None else None
        self._last_scores = scores.clone()
        self.history.append({"step": step, "target": round(ratio, 6), "removed": round(self.sparsity, 6),
                             "newly_masked": newly, "restored": restored, "score_rank_corr": stability})

    def status(self) -> str:
        return f"pruned {self.sparsity:.1%}"

    def state_dict(self) -> dict:
        return {"masks": self.masks.state_dict(), "importance": self.importance.state_dict(),
                "history": list(self.history), "sparsity": self.sparsity, "last_scores": self._last_scores}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        self.masks.load_state_dict(state["masks"])
        self.importance.load_state_dict(state["importance"])
        self.history = list(state["history"])
        self.sparsity = float(state["sparsity"])
        self._last_scores = state["last_scores"]


class LoraPrunePass(LoraPrune):
    """Runs the ``loraprune`` pass (declared by :class:`passes.loraprune.LoraPrune`)."""

    def __init__(self, options: "LoraPrunePass.Options"):
        self.options = options

    # ------------------------------------------------------------------------------- parts
    def skip_layers(self, num_layers: int) -> set[int]:
        from compress.errors import CompressError

        chosen = self.options.skip_layers
        if chosen is None:
            return set(default_skip_layers(num_layers))
        bad = [i for i in chosen if not -num_layers <= i < num_layers]
        if bad:
            raise CompressError(f"skip_layers: {bad} out of range for a model with {num_layers} layers")
        return {i % num_layers for i in chosen}

    def train(self, ctx) -> tuple[LoraPruneHooks, object]:
        """Train with masks; returns the hooks (masks still applied, adapters attached) and the result.
        Call :meth:`finish` afterwards (it removes the hooks and adapters)."""
        from compress.errors import CompressError
        from dataclasses import replace

        from compress.calibration.sources import window_bos
        from compress.training import LoRASpec, run_fingerprint, train_lora

        o = self.options
        if o.prune_warmup + o.prune_cooldown >= 1.0:
            raise CompressError("prune_warmup + prune_cooldown must leave some steps for the ramp (sum < 1)")
        adapter = ctx.adapter()
        names = target_names(ctx, o.target_modules)
        ids = training_ids(ctx, o.source, "loraprune")
        lora = LoRASpec(target_modules=tuple(n for layer in names for n in layer), rank=o.rank, alpha=o.alpha,
                        dropout=o.dropout)
        train = replace(o.train_spec(), bos=window_bos(ctx.tokenizer))
        fingerprint = run_fingerprint(ctx.model, ids, lora, train, extra={"pass": "loraprune", **o.model_dump()})
        hooks = LoraPruneHooks(self, adapter, self.skip_layers(adapter.num_layers))
        try:
            result = train_lora(ctx.model, ids, lora, train, checkpoint_dir=o.checkpoint_folder(fingerprint),
                                checkpoint_every=o.checkpoint_every, fingerprint=fingerprint, progress=ctx.progress,
                                description="LoRAPrune", hooks=hooks)
        except BaseException:
            hooks.close()
            raise
        return hooks, result

    def finish(self, ctx, hooks: LoraPruneHooks) -> tuple[list, dict[str, torch.Tensor]]:
        """Drop the hooks and adapters, slice the masked units, add the cut LoRA factors."""
        from compress.pruning.surgeon import apply_layer_plan, slice_lora_factors
        from compress.training import apply_lora_factors, detach_lora, lora_factors

        hooks.close()
        factors = lora_factors(ctx.model)
        detach_lora(ctx.model)
        adapter = ctx.adapter()
        plans = hooks.masks.layer_plans(adapter, self.options.gqa)
        factors = slice_lora_factors(ctx.model, adapter, plans, factors)
        for plan in plans:
            apply_layer_plan(adapter, plan)
        apply_lora_factors(ctx.model, factors)
        return plans, factors

    # -------------------------------------------------------------------------------- run
    def run(self, ctx) -> PlanStep:
        hooks, result = self.train(ctx)
        plans, factors = self.finish(ctx, hooks)
        details = {
            "importance": self.options.importance,
            "removed_fraction": hooks.sparsity,
            "skip_layers": sorted(hooks.skip_layers),
            "mask_updates": hooks.history,
            "importance_updates": hooks.importance.updates,
            "importance_skipped_nan": hooks.importance.skipped,
            **result.summary(),
        }
        return PlanStep(self.name, self.options.model_dump(), layers=plans, artifacts={ARTIFACT: factors},
                        details=details)

    @staticmethod
    def replay(model, step: PlanStep) -> None:
        """``compress apply``: after the surgeon sliced the layers, add the saved (cut) LoRA factors."""
        from compress.errors import PlanError
        from compress.training import apply_lora_factors

        if ARTIFACT not in step.artifacts:
            raise PlanError(f"the loraprune step has no {ARTIFACT!r} artifact (the LoRA factors)")
        apply_lora_factors(model, step.artifacts[ARTIFACT])
