"""The ``spa`` pass: prune an ONNX model through the coupled-channel groups of its graph.

Groups come from ``grouping.find_groups``; each selected group becomes a ``UnitSet`` scored by an
importance, the allocator picks how many units each keeps under the parameter budget, and
``surgery.prune_onnx`` cuts the graph. The plan step records every pruned group (its member
slices and kept units), so the cut can be read back without the scores.

The pass's name, options and docs are declared in :mod:`passes.spa`; this is what runs it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from compress.models.onnx_graph import OnnxPassContext
from compress.plan import PlanStep
from passes.spa import Spa


TOKEN_INPUTS = {  # graph input -> its feed for [batch, seq] token ids (no padding)
    "input_ids": lambda ids: ids,
    "attention_mask": lambda ids: np.ones(ids.shape, np.int64),
    "token_type_ids": lambda ids: np.zeros(ids.shape, np.int64),
    "position_ids": lambda ids: np.tile(np.arange(ids.shape[1], dtype=np.int64), (ids.shape[0], 1)),
}


def select_groups(groups, granularity: str) -> list:
    """The prunable groups to use. 'coarsest': where groups overlap on a tensor axis (KV groups,
    query-head slots and head dims all cut q_proj's rows), only the one with the widest contiguous
    block; 'all': every prunable group."""
    prunable = [g for g in groups if g.prunable]
    if granularity == "all":
        return prunable
    taken: set[tuple[str, int]] = set()
    chosen = []
    for group in sorted(prunable, key=lambda g: (-max(s.block for s in g.slices), g.id)):
        axes = {(s.tensor, s.axis) for s in group.slices if s.role != "channel"}
        if axes & taken:
            continue
        taken |= axes
        chosen.append(group)
    return sorted(chosen, key=lambda g: g.id)


class SpaPass(Spa):
    """Runs the ``spa`` pass (declared by :class:`passes.spa.Spa`)."""

    def __init__(self, options: "SpaPass.Options"):
        self.options = options

    def text_windows(self, ctx) -> np.ndarray:
        """[samples, seqlen] token ids: random windows of the calibration text."""
        from transformers import AutoTokenizer

        from compress.calibration.sources import random_windows, read_text, tokenize_text
        from compress.errors import CompressError

        o = self.options
        folder = Path(o.tokenizer).expanduser() if o.tokenizer else ctx.source.parent
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception:
            raise CompressError(f"tokenizer: no tokenizer in {folder} (reading the calibration text needs one; set "
                                "`tokenizer:` to its folder, or use a data-free importance)") from None
        return random_windows(tokenize_text(tokenizer, read_text(o.source)), o.samples, o.seqlen, o.seed,
                              source=o.source, field=f"passes.{self.name}").numpy()

    def synthetic_windows(self, ctx) -> np.ndarray:
        """[samples, seqlen] token ids drawn uniformly from the vocabulary of the embedding table that
        ``input_ids`` indexes (seeded)."""
        from compress.errors import CompressError

        o = self.options
        tables = {i.name: i.dims[0] for i in ctx.model.graph.initializer if len(i.dims) == 2}
        vocab = next((tables[n.input[0]] for n in ctx.model.graph.node
                      if n.op_type == "Gather" and n.input[1] == "input_ids" and n.input[0] in tables), None)
        if vocab is None:
            raise CompressError(f"{ctx.source}: hessian synthetic found no embedding table indexed by input_ids")
        return np.random.default_rng(o.seed).integers(0, vocab, size=(o.samples, o.seqlen))

    def feed_batches(self, session_inputs, windows: np.ndarray | None) -> list[dict[str, np.ndarray]]:
        """Feeds for every graph input, ``batch_size`` sequences at a time: token inputs from
        ``windows`` ([samples, seqlen] ids, or None when the graph takes no tokens); float inputs
        (images) standard-normal with their static shape (a dynamic first axis becomes the batch)."""
        from compress.errors import CompressError

        o = self.options
        rng = np.random.default_rng(o.seed)
        batches = []
        for start in range(0, o.samples, o.batch_size):
            b = min(o.batch_size, o.samples - start)
            ids = windows[start:start + b].astype(np.int64) if windows is not None else None
            feeds = {}
            for value in session_inputs:
                if ids is not None and value.name in TOKEN_INPUTS:
                    feeds[value.name] = TOKEN_INPUTS[value.name](ids)
                elif value.name.startswith("past_key_values") and len(value.shape) == 4:
                    feeds[value.name] = np.zeros((b, value.shape[1], 0, value.shape[3]), np.float32)
                elif value.type == "tensor(float)":
                    shape = [b if axis == 0 and not isinstance(d, int) else d for axis, d in enumerate(value.shape)]
                    if not all(isinstance(d, int) for d in shape):
                        raise CompressError(f"graph input {value.name!r}: cannot draw synthetic values for the dynamic "
                                            f"shape {value.shape}")
                    feeds[value.name] = rng.standard_normal(shape).astype(np.float32)
                else:
                    raise CompressError(f"graph input {value.name!r}: cannot feed it "
                                        + ("from token windows" if ids is not None else "without token windows"))
            batches.append(feeds)
        return batches

    def compensation(self) -> str:
        o = self.options
        return o.compensation or ("obs" if o.importance == "obs" else "none")

    def uses_obs(self) -> bool:
        return self.options.importance == "obs" or self.compensation() == "obs"

    def statistics(self, ctx, selected, tensors):
        """(consumer inputs, collected InputStats per activation, damped Hessians per activation or None)."""
        from compress.errors import CompressError
        from passes.spa.activations import consumer_inputs, input_statistics
        from passes.spa.obs import damped, stats_hessians

        o = self.options
        inputs = consumer_inputs(ctx.model, selected)
        needs_text = o.importance == "activation" or (self.uses_obs() and o.hessian == "calibration")
        needs_forward = needs_text or (self.uses_obs() and o.hessian == "synthetic")
        stats = {}
        if needs_forward:
            has_tokens = any(i.name == "input_ids" for i in ctx.model.graph.input)
            if needs_text and not has_tokens:
                raise CompressError(f"{ctx.source}: calibration text needs an `input_ids` graph input; for other "
                                    "models use importance magnitude, or obs with hessian synthetic or identity")
            windows = (self.text_windows(ctx) if needs_text else self.synthetic_windows(ctx)) if has_tokens else None
            stats = input_statistics(ctx.model, {i.activation: i.channel_axis for i in inputs.values()},
                                     lambda session_inputs: self.feed_batches(session_inputs, windows),
                                     gram=self.uses_obs())
        hessians = None
        if self.uses_obs() and o.hessian == "identity":
            sizes = {inputs[s.tensor].activation: tensors[s.tensor].shape[s.axis] for g in selected for s in g.slices
                     if s.role == "consumer" and s.tensor in inputs}
            hessians = {name: damped(torch.eye(size, dtype=torch.float64), o.damp) for name, size in sizes.items()}
        elif self.uses_obs():
            hessians = stats_hessians(stats, o.damp)
        return inputs, stats, hessians

    def scores(self, selected, tensors, inputs, stats, hessians) -> list[torch.Tensor]:
        from compress.pruning.groups import magnitude_scores

        if self.options.importance == "magnitude":
            return [magnitude_scores(g, tensors) for g in selected]
        if self.options.importance == "activation":
            from passes.spa.activations import activation_scores

            return [activation_scores(g, tensors, stats, inputs) for g in selected]
        from passes.spa.obs import ObsScorer

        scorer = ObsScorer(hessians, inputs)
        return [scorer.scores(g, tensors) for g in selected]

    def compensate(self, selected, keep, shapes, tensors, inputs, hessians) -> dict[str, torch.Tensor]:
        """The consumers refit to their kept columns (dense shapes): initializer name -> tensor."""
        from passes.spa.obs import compensate
        from compress.models.onnx_graph.surgery import kept_indices

        consumer_axes = {(s.tensor, s.axis) for g in selected for s in g.slices if s.role == "consumer"}
        kept = {key: torch.from_numpy(index) for key, index in kept_indices(selected, keep, shapes).items()
                if key in consumer_axes}
        return compensate(tensors, kept, hessians, inputs)

    @classmethod
    def replay(cls, ctx: OnnxPassContext, step: PlanStep) -> None:
        """Re-cut ``ctx.model`` as ``step`` did, without scores or data: the graph's groups must be
        the recorded ones; the refit consumers come from the step's ``refit`` artifact."""
        from compress.errors import PlanError
        from compress.pruning.groups import ChannelGroup
        from compress.models.onnx_graph.grouping import find_groups
        from compress.models.onnx_graph.surgery import prune_onnx

        options = cls.Options(**step.options)
        groups, graph = find_groups(ctx.model, tuple(options.resizable_io))
        by_id = {g.id: g for g in groups}
        keep = {}
        for recorded in step.details.get("groups", []):
            group = ChannelGroup.from_dict(recorded)
            found = by_id.get(group.id)
            if found is None or found.slices != group.slices or found.units != group.units:
                raise PlanError(f"plan group {group.id} ({group.label}) is not in {ctx.source}: the plan was made "
                                "for another graph")
            keep[group.id] = list(recorded["keep"])
        ctx.model = prune_onnx(ctx.model, groups, graph, keep)
        _set_initializers(ctx.model, step.artifacts.get("refit", {}))

    def keep_counts(self, unit_sets, total_params: float) -> list[int]:
        from compress.pruning.allocators import allocate_pooled
        from compress.pruning.units import standardize

        o = self.options
        if o.allocator == "uniform":
            return [max(min(u.min_keep, u.size), round((1.0 - o.ratio) * u.size)) for u in unit_sets]
        kinds: dict[tuple, list] = {}
        for units in unit_sets:
            kinds.setdefault((units.size, units.cost) if o.standardize == "kind" else id(units), []).append(units)
        for members in kinds.values():
            pooled = standardize(torch.cat([u.scores.to(torch.float64) for u in members]))
            for units, z in zip(members, pooled.split([u.size for u in members])):
                units.scores = z
        return allocate_pooled(unit_sets, (1.0 - o.ratio) * total_params)

    def run(self, ctx: OnnxPassContext) -> PlanStep:
        from onnx import numpy_helper

        from compress.errors import CompressError
        from compress.pruning.units import UnitSet
        from compress.models.onnx_graph.grouping import find_groups
        from compress.models.onnx_graph.surgery import prune_onnx

        o = self.options
        groups, graph = find_groups(ctx.model, tuple(o.resizable_io))
        selected = select_groups(groups, o.granularity)
        if not selected:
            raise CompressError(f"{ctx.source}: no prunable group (every group is frozen; `compress inspect "
                                f"{ctx.source}` says why)")
        tensors = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy())
                   for i in ctx.model.graph.initializer if i.name in {s.tensor for g in selected for s in g.slices}}
        shapes = graph.initializer_shapes
        inputs, stats, hessians = self.statistics(ctx, selected, tensors)
        scores = self.scores(selected, tensors, inputs, stats, hessians)
        unit_sets = [UnitSet(layer=g.id, kind="group", scores=score, cost=g.unit_cost(shapes), min_keep=o.min_units)
                     for g, score in zip(selected, scores)]
        total = sum(u.size * u.cost for u in unit_sets)
        counts = self.keep_counts(unit_sets, total)
        keep = {g.id: u.kept_units(n) for g, u, n in zip(selected, unit_sets, counts)}
        refit = {}
        if self.compensation() == "obs":
            refit = self.compensate(selected, keep, shapes, tensors, inputs, hessians)
            _set_initializers(ctx.model, refit)
        ctx.model = prune_onnx(ctx.model, groups, graph, keep)
        if refit:  # the plan keeps the refit consumers as cut (kept columns only), for replay
            refit = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy())
                     for i in ctx.model.graph.initializer if i.name in refit}
        removed = sum((u.size - n) * u.cost for u, n in zip(unit_sets, counts))
        details = {
            "importance": o.importance,
            "hessian": o.hessian if self.uses_obs() else None,
            "compensation": self.compensation(),
            "compensated_tensors": len(refit),
            "groups_found": len(groups),
            "groups_prunable": sum(g.prunable for g in groups),
            "groups_pruned": sum(n < u.size for u, n in zip(unit_sets, counts)),
            "selected_params": total,
            "removed_params": removed,
            "removed_fraction_of_selected": removed / total if total else 0.0,
            "groups": [{**g.to_dict(), "keep": keep[g.id]} for g in selected if len(keep[g.id]) < g.units],
        }
        return PlanStep(self.name, o.model_dump(), layers=[], details=details,
                        artifacts={"refit": refit} if refit else {})


def _set_initializers(model, tensors: dict[str, torch.Tensor]) -> None:
    """Replace the named initializers of ``model`` in place (same names, same shapes)."""
    from onnx import numpy_helper

    from compress.errors import PlanError

    for initializer in model.graph.initializer:
        if initializer.name in tensors:
            value = tensors[initializer.name].numpy()
            if tuple(value.shape) != tuple(initializer.dims):
                raise PlanError(f"initializer {initializer.name}: the plan's tensor has shape {tuple(value.shape)}, "
                                f"the graph's {tuple(initializer.dims)}")
            initializer.CopyFrom(numpy_helper.from_array(value, initializer.name))
