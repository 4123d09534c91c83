"""Structured pruning of LLaMA-family decoders: Scorer ► units ► Allocator ► plan ► Surgeon.

``StructuredPruner`` is the engine behind ``flap``, ``wanda_sp`` and ``magnitude_sp``: the passes
only choose the scorer, the aggregation of channel scores into units, the allocator and the
compensation. The result is a ``PlanStep``; the model is sliced through the same surgeon that
``compress apply`` uses, so replaying the plan gives identical weights.
"""

from __future__ import annotations

import torch

from compress.calibration.runner import LayerRunner, input_hooks
from compress.calibration.stats import ChannelStats, ReferenceFluctuation
from compress.errors import CompressError
from compress.plan import LayerPlan, PlanStep
from compress.pruning.allocators import (
    allocate_block_budget,
    allocate_global,
    allocate_global_reference,
    allocate_uniform,
    round_channels,
    uniform_share,
)
from compress.pruning.blocks import InMemoryBlocks
from compress.pruning.block_importance import BlockDistance, measure_block_importance
from compress.pruning.compensation import DriftStats, GramStats, choose_damp, choose_drift_damp, least_squares_refit
from compress.pruning.scores import ConsumerStats, LayerScores
from compress.pruning.search import SearchResult, SearchSettings, search_allocation
from compress.pruning.settings import PrunerSettings
from compress.pruning.surgeon import REFIT_ARTIFACT, apply_layer_plan, summed_bias
from compress.pruning.units import LayerUnits, build_layer_units, kept_heads


class StructuredPruner:
    def __init__(self, scorer, settings: PrunerSettings):
        self.scorer = scorer
        self.settings = settings
        self.block_importance: list[float] = []  # block_budget: one per layer, from the dense pass
        self.refit: dict[str, torch.Tensor] = {}  # least_squares: consumer weights, see REFIT_ARTIFACT
        self.chosen_damps: dict[str, float] = {}  # ls_damp auto: "{layer}.{consumer}" -> the damp held-out data chose
        self.search: SearchResult | None = None  # allocator search: what the search did
        self.share = settings.ratio  # uniform: what every pruned layer loses (set by run from skip_layers)

    # ------------------------------------------------------------------ statistics
    def _new_stats(self, adapter, layer_index: int, refit: bool = True) -> ConsumerStats:
        device = adapter.attention_consumer(layer_index).weight.device
        attn_in = adapter.attention_consumer(layer_index).in_features
        mlp_in = adapter.mlp_consumer(layer_index).in_features
        reference = self.settings.reference_statistics
        refits = refit and self.settings.compensation == "least_squares"
        gram = refits or getattr(self.scorer, "needs_gram", False)
        heldout = refits and self.needs_heldout
        return ConsumerStats(
            attn=ChannelStats(attn_in, device),
            mlp=ChannelStats(mlp_in, device),
            attn_reference=ReferenceFluctuation(attn_in, device) if reference else None,
            mlp_reference=ReferenceFluctuation(mlp_in, device) if reference else None,
            attn_gram=GramStats(attn_in, device) if gram else None,
            mlp_gram=GramStats(mlp_in, device) if gram else None,
            attn_heldout=GramStats(attn_in, device) if heldout else None,
            mlp_heldout=GramStats(mlp_in, device) if heldout else None,
        )

    @property
    def needs_heldout(self) -> bool:
        """Held-out calibration windows are run too (ls_damp auto and the drift correction choose
        their ridge on them)."""
        return self.settings.compensation == "least_squares" and (self.settings.ls_damp is None or self.corrects_drift)

    @property
    def corrects_drift(self) -> bool:
        """ls_target dense_output: down_proj also absorbs the block output's drift from the dense model."""
        s = self.settings
        return s.compensation == "least_squares" and s.ls_target == "dense_output" and s.sequential

    def observe_block(self, runner: LayerRunner, layer_index: int, update: bool, refit: bool = True) -> ConsumerStats:
        """Run one block on the calibration set, recording its consumers' input statistics (without
        ``refit``, not the Gram matrices a least-squares refit needs: a sweep whose statistics only
        score, e.g. the first of a sequential run, saves their memory)."""
        adapter = runner.adapter
        stats = self._new_stats(adapter, layer_index, refit)
        targets = {"attn": adapter.attention_consumer(layer_index), "mlp": adapter.mlp_consumer(layer_index)}

        def record(name: str, x: torch.Tensor) -> None:
            if runner.in_heldout:
                heldout = getattr(stats, f"{name}_heldout")
                if heldout is not None:
                    heldout.update(x)
                return
            getattr(stats, name).update(x)
            for extra in (getattr(stats, f"{name}_reference"), getattr(stats, f"{name}_gram")):
                if extra is not None:
                    extra.update(x)

        measure_block = update and self.settings.allocator == "block_budget"
        before = list(runner.hidden[:runner.calibration_batches]) if measure_block else []
        with input_hooks(targets, record):
            runner.run_block(layer_index, update=update)
        if measure_block:
            distance = BlockDistance(self.settings.block_metric)
            for x_in, x_out in zip(before, runner.hidden[:runner.calibration_batches]):
                distance.update(x_in, x_out)
            self.block_importance.append(distance.value)
        return stats

    # ------------------------------------------------------------------ plan pieces
    def layer_units(self, adapter, layer_index: int, scores: LayerScores) -> LayerUnits:
        s = self.settings
        units = build_layer_units(
            adapter,
            layer_index,
            scores,
            gqa=s.gqa,
            aggregation=s.aggregation,
            min_heads=s.min_heads,
            min_channels=s.min_channels,
        )
        if layer_index in {i % adapter.num_layers for i in s.skip_layers}:
            units.attn.min_keep, units.mlp.min_keep = units.attn.size, units.mlp.size
        if not s.prune_attention:
            units.attn.min_keep = units.attn.size
        return units

    def _compensation(self, weight: torch.Tensor, mean: torch.Tensor, keep_channels: list[int]) -> list[float] | None:
        """FLAP bias: ``W[:, removed] @ mean[removed]`` ([out]), the removed channels' mean output."""
        removed = torch.ones(weight.shape[1], dtype=torch.bool)
        removed[torch.tensor(keep_channels, dtype=torch.long)] = False
        if not removed.any():
            return None
        if self.settings.reference_statistics:
            mean = mean.to(torch.float16).to(torch.float64)
        delta = weight.detach().to(torch.float64)[:, removed.to(weight.device)] @ mean[removed.to(mean.device)]
        return LayerPlan.bias_values(delta)

    def layer_plan(
        self, adapter, units: LayerUnits, attn_keep: int, mlp_keep: int, stats: ConsumerStats | None
    ) -> LayerPlan:
        i = units.attn.layer
        mlp_keep = round_channels(mlp_keep, self.settings.round_to, units.mlp.size)
        heads, kv_heads = kept_heads(units.attn, units.attn.kept_units(attn_keep))
        channels = units.mlp.kept_units(mlp_keep)
        widths = adapter.widths(i)
        plan = LayerPlan(
            index=i,
            keep_heads=heads if len(heads) < widths.heads else None,
            keep_kv_heads=kv_heads if kv_heads is not None and len(kv_heads) < widths.kv_heads else None,
            keep_channels=channels if len(channels) < widths.intermediate else None,
        )
        if self.settings.compensation == "least_squares" and stats is not None:
            self._least_squares(adapter, plan, stats)
        if self.settings.compensation == "bias" and stats is not None:
            d = adapter.head_dim
            if plan.keep_heads is not None:
                head_channels = [h * d + k for h in plan.keep_heads for k in range(d)]
                plan.o_proj_bias = self._compensation(adapter.attention_consumer(i).weight, stats.attn.mean, head_channels)
            if plan.keep_channels is not None:
                plan.down_proj_bias = self._compensation(adapter.mlp_consumer(i).weight, stats.mlp.mean, plan.keep_channels)
        return plan

    def _least_squares(self, adapter, plan: LayerPlan, stats: ConsumerStats) -> None:
        """Refit o_proj/down_proj on their kept inputs; weights go to ``self.refit``, the intercept
        to the plan's compensation bias."""
        i, d = plan.index, adapter.head_dim
        pieces = []
        if plan.keep_heads is not None:
            channels = [h * d + k for h in plan.keep_heads for k in range(d)]
            pieces.append(("o_proj", adapter.attention_consumer(i), stats.attn_gram, channels, "o_proj_bias"))
        if plan.keep_channels is not None:
            pieces.append(("down_proj", adapter.mlp_consumer(i), stats.mlp_gram, plan.keep_channels, "down_proj_bias"))
        for name, consumer, gram, channels, bias_field in pieces:
            if self.settings.ls_damp is None:
                heldout = stats.attn_heldout if name == "o_proj" else stats.mlp_heldout
                damp, weight, intercept, _ = choose_damp(consumer.weight, gram, heldout, channels, self.settings.ls_prior)
                self.chosen_damps[f"{i}.{name}"] = damp
            else:
                weight, intercept = least_squares_refit(consumer.weight, gram, channels, self.settings.ls_damp,
                                                        self.settings.ls_prior)
            self.refit[f"{i}.{name}"] = weight.to(dtype=consumer.weight.dtype).cpu()
            setattr(plan, bias_field, LayerPlan.bias_values(intercept))

    def _apply(self, adapter, plan: LayerPlan) -> None:
        apply_layer_plan(adapter, plan, self.refit)

    def _step(self, plans: list[LayerPlan]) -> PlanStep:
        artifacts = {REFIT_ARTIFACT: dict(self.refit)} if self.refit else {}
        details = {"ls_damp_chosen": dict(self.chosen_damps)} if self.chosen_damps else {}
        if self.search is not None:
            details.update(self.search.details())
        return PlanStep(pass_name="", options={}, layers=plans, artifacts=artifacts, details=details)

    # ------------------------------------------------------------------ drivers
    def run(self, ctx) -> PlanStep:
        """Prune ``ctx.model`` in place; return the step that reproduces it. The blocks come from
        ``ctx.blocks`` (out of core: streamed from the checkpoint), else from memory."""
        adapter = ctx.adapter()
        s = self.settings
        bad = [i for i in s.skip_layers if not -adapter.num_layers <= i < adapter.num_layers]
        if bad:
            raise CompressError(f"skip_layers: {bad} out of range for a model with {adapter.num_layers} layers")
        blocks = ctx.blocks if ctx.blocks is not None else InMemoryBlocks(ctx)
        blocks.check(s)
        self.share = self.uniform_ratio(adapter) if s.allocator == "uniform" else s.ratio
        if not self.scorer.needs_activations:
            return self._run_data_free(adapter, ctx, blocks)
        if s.allocator == "uniform":
            return self._run_layerwise(adapter, blocks)
        return self._run_global(adapter, ctx, blocks)

    def _run_data_free(self, adapter, ctx, blocks) -> PlanStep:
        """Scores read from the weights: the uniform allocator decides each layer alone (one
        sweep); the others need every layer's scores first (a scoring sweep, then a slicing one)."""
        s = self.settings
        if s.allocator == "uniform":
            plans = []
            for i in blocks.sweep(adapter, "pruning layers"):
                with blocks.visit("prune", i):
                    units = self.layer_units(adapter, i, self.scorer(adapter, i, None))
                    (attention, mlp), = self.allocate([units])
                    plans.append(self._finish_layer(adapter, blocks, self.layer_plan(adapter, units, attention, mlp, None)))
            return self._step(plans)
        if s.allocator == "block_budget":
            self.block_importance = measure_block_importance(
                adapter, ctx.calibration_ids(), ctx.batch_size, s.block_metric, ctx.progress
            )
        all_units = []
        for i in blocks.sweep(adapter, "scoring layers"):
            with blocks.visit("score", i):
                all_units.append(self.layer_units(adapter, i, self.scorer(adapter, i, None)))
        counts = self.allocate(all_units)
        if s.allocator == "search":
            counts = self._search(adapter, all_units, None, counts, ctx)
        return self._slice_all(adapter, blocks, all_units, counts, None)

    def uniform_ratio(self, adapter) -> float:
        """The share every pruned layer loses under the uniform allocator: ``ratio`` of the whole
        decoder, spread over the layers that are not skipped."""
        totals = [sum(linear.weight.numel() for linear in {**adapter.attention_linears(i),
                                                          **adapter.mlp_linears(i)}.values())
                  for i in range(adapter.num_layers)]
        skipped = {i % adapter.num_layers for i in self.settings.skip_layers}
        try:
            return uniform_share(totals, skipped, self.settings.ratio)
        except ValueError as error:
            raise CompressError(f"ratio: {error}") from None

    def _run_layerwise(self, adapter, blocks) -> PlanStep:
        """Uniform allocation decides each layer alone, so layers are pruned as they are reached;
        with ``sequential`` the pruned block's outputs feed the next block."""
        runner = self._sequential_runner(adapter, blocks)
        plans = []
        try:
            for i in blocks.sweep(adapter, "pruning layers"):
                with blocks.visit("prune", i):
                    plans.append(self._prune_layer(adapter, blocks, runner, i, None, self.settings.sequential))
        finally:
            runner.close()
        return self._step(plans)

    def allocate(self, all_units: list[LayerUnits]) -> list[tuple[int, int]]:
        s = self.settings
        if s.allocator == "uniform":  # each layer alone (one or all of them): the share set by run()
            return allocate_uniform(all_units, self.share)
        if s.allocator == "block_budget":
            try:
                return allocate_block_budget(all_units, s.ratio, self.block_importance, s.block_temperature, s.round_to)
            except ValueError as error:
                raise CompressError(f"ratio: {error}") from None
        if s.reference_threshold:
            return allocate_global_reference(all_units, s.ratio)
        return allocate_global(all_units, s.ratio)  # "search" starts from it

    def _search(self, adapter, all_units, all_stats, start, ctx) -> list[tuple[int, int]]:
        """Refine the global allocation ``start`` by search (see compress.pruning.search)."""
        s = self.settings
        windows = ctx.heldout_ids()[: s.search_windows]
        self.search = search_allocation(adapter, all_units, all_stats, start, windows,
                                        SearchSettings(evaluations=s.search_evaluations, seed=s.search_seed),
                                        compensate=s.compensation != "none" and all_stats is not None,
                                        batch_size=ctx.batch_size,
                                        progress=ctx.progress)
        return self.search.counts

    def _run_global(self, adapter, ctx, blocks) -> PlanStep:
        """Score every layer on the dense model, allocate globally, then slice. With
        ``sequential`` a second sweep re-scores each layer on the already-pruned upstream layers
        (keeping the allocated widths) so channel choice and compensation see the pruned inputs."""
        s = self.settings
        # A sequential run refits in its second sweep: the first needs no held-out windows or Grams.
        runner = blocks.runner(adapter, heldout=self.needs_heldout and not s.sequential)
        all_stats, all_units = [], []
        self.block_importance = []
        try:
            for i in blocks.sweep(adapter, "scoring layers"):
                with blocks.visit("score", i):
                    stats = self.observe_block(runner, i, update=True, refit=not s.sequential)
                    all_stats.append(stats)
                    all_units.append(self.layer_units(adapter, i, self.scorer(adapter, i, stats)))
        finally:
            runner.close()
        counts = self.allocate(all_units)
        if s.allocator == "search":
            counts = self._search(adapter, all_units, all_stats, counts, ctx)
        if not s.sequential:
            return self._slice_all(adapter, blocks, all_units, counts, all_stats)
        runner = self._sequential_runner(adapter, blocks)
        plans = []
        try:
            for i in blocks.sweep(adapter, "re-scoring on pruned inputs"):
                with blocks.visit("slice", i):
                    plans.append(self._prune_layer(adapter, blocks, runner, i, counts[i], True))
        finally:
            runner.close()
        return self._step(plans)

    def _sequential_runner(self, adapter, blocks) -> LayerRunner:
        """The runner of the sweep that slices (with the dense model's stream beside the pruned one
        when the drift is corrected)."""
        runner = blocks.runner(adapter, heldout=self.needs_heldout)
        if self.corrects_drift:
            runner.track_dense()
        return runner

    # ------------------------------------------------------------------ one layer
    def _slice_all(self, adapter, blocks, all_units, counts, all_stats) -> PlanStep:
        """Plan and slice every layer to its allocated ``counts`` (a plan reads only its own
        layer's weights, so slicing layer by layer equals planning all first)."""
        plans = []
        for i in blocks.sweep(adapter, "slicing layers"):
            with blocks.visit("slice", i):
                plan = self.layer_plan(adapter, all_units[i], *counts[i], all_stats[i] if all_stats else None)
                plans.append(self._finish_layer(adapter, blocks, plan))
        return self._step(plans)

    def _prune_layer(self, adapter, blocks, runner, index: int, counts, sequential: bool) -> LayerPlan:
        """Score block ``index`` on the inputs the runner holds, slice it to ``counts`` (attention,
        MLP units; None: the layer's own uniform allocation) and emit it; sequential: then pass
        the pruned block's outputs on as the next block's inputs."""
        stats = self.observe_block(runner, index, update=not sequential)
        units = self.layer_units(adapter, index, self.scorer(adapter, index, stats))
        (attention, mlp), = self.allocate([units]) if counts is None else (counts,)
        plan = self.layer_plan(adapter, units, attention, mlp, stats)
        drift = self.corrects_drift  # only with settings.sequential: every sweep that slices here is sequential
        if drift:
            runner.run_dense_block(index)  # the dense model's outputs of this block, before it is sliced
            consumer_bias = adapter.mlp_consumer(index).bias
            base_bias = consumer_bias.detach().clone() if consumer_bias is not None else None
        self._apply(adapter, plan)
        if drift:
            self._correct_drift(adapter, runner, plan, base_bias)
        if sequential:
            runner.run_block(index, update=True)
        blocks.emit(index)
        return plan

    def _correct_drift(self, adapter, runner, plan: LayerPlan, base_bias: torch.Tensor | None) -> None:
        """Refit the sliced down_proj once more so the block's output follows the dense model's own
        block output (the runner's dense stream), absorbing the drift carried from upstream layers
        and left by this block's attention: a ridge correction toward the refit weights, its strength
        chosen on the held-out windows (infinite: none). Updates the refit artifact and the plan's
        bias, so replaying the plan gives these weights."""
        i, key = plan.index, f"{plan.index}.down_proj"
        if key not in self.refit or plan.down_proj_bias is None:  # the MLP was kept whole
            return
        consumer = adapter.mlp_consumer(i)
        device = consumer.weight.device
        fit = DriftStats(consumer.in_features, consumer.out_features, device)
        heldout = DriftStats(consumer.in_features, consumer.out_features, device)
        inputs: dict[str, torch.Tensor] = {}

        def compare(b: int, out: torch.Tensor) -> None:
            (heldout if runner.in_heldout else fit).update(inputs["mlp"], runner.dense_hidden[b] - out)

        with input_hooks({"mlp": consumer}, inputs.__setitem__):
            runner.run_block(i, update=False, on_output=compare)
        damp, delta, _ = choose_drift_damp(fit, heldout)
        self.chosen_damps[f"{i}.drift"] = damp
        if not delta.any():
            return
        k = consumer.in_features
        weight = self.refit[key].to(torch.float64) + delta[:k].T.cpu()
        self.refit[key] = weight.to(consumer.weight.dtype)
        plan.down_proj_bias = LayerPlan.bias_values(torch.tensor(plan.down_proj_bias, dtype=torch.float64)
                                                    + delta[k].cpu())
        with torch.no_grad():  # what apply_layer_plan builds from the updated plan
            consumer.weight.copy_(self.refit[key].to(device))
            consumer.bias.copy_(summed_bias(base_bias, plan.down_proj_bias, consumer.weight))

    def _finish_layer(self, adapter, blocks, plan: LayerPlan) -> LayerPlan:
        self._apply(adapter, plan)
        blocks.emit(plan.index)
        return plan
