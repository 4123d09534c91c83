"""The ``spa`` pass: prune an ONNX model through the coupled-channel groups of its graph.

Groups come from ``grouping.find_groups``; each selected group becomes a ``UnitSet`` scored by an
importance, the allocator picks how many units each keeps under the parameter budget, and
``surgery.prune_onnx`` cuts the graph. The plan step records every pruned group (its member
slices and kept units), so the cut can be read back without the scores.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from compress.recipe import TextSource

from compress.plan import PlanStep
from compress.registry import register_pass


@dataclass
class OnnxPassContext:
    """What a pass on an ONNX model sees: the model (weights loaded) and where it came from."""

    model: object  # onnx.ModelProto, replaced by each pass
    source: Path
    progress: bool = True
    shapes_before: dict[str, tuple[int, ...]] = field(default_factory=dict)


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


@register_pass("spa")
class SpaPass:
    """SPA: structured pruning of any ONNX model through the coupled-channel groups of its graph.

    Groups are found by propagating channel dependencies through the graph with one rule per op
    (anything not understood is frozen); each unit of a group is scored by its weights' magnitude;
    the allocator keeps the strongest units under the budget; initializers are sliced and the
    Reshape/Expand literals that count the pruned units are patched.
    """

    needs_calibration = False
    model_format = "onnx"

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")

        ratio: float = Field(
            gt=0.0, lt=1.0, description="'uniform': the share of units every group loses; 'global': the share of "
            "the selected groups' parameters (counted per group) to remove. A weight read and written by two "
            "pruned groups loses both shares, so the parameters removed can exceed the ratio (see the report)."
        )
        importance: Literal["magnitude", "activation"] = Field(
            "magnitude", description="Unit score. 'magnitude' (data-free): group L2 magnitude of the producer and "
            "consumer weights, each tensor normalised by its mean. 'activation': Wanda-sp on the graph, "
            "‖consumer weight row‖ · RMS of the activation it reads, measured with ONNX Runtime on calibration text."
        )
        source: TextSource = Field("austen", description="activation: calibration text.")
        tokenizer: Optional[str] = Field(
            None, description="activation: folder with the model's tokenizer (default: the ONNX file's folder)."
        )
        samples: int = Field(32, ge=1, description="activation: calibration windows.")
        seqlen: int = Field(128, ge=2, description="activation: tokens per window.")
        batch_size: int = Field(8, ge=1, description="activation: windows per ONNX Runtime call.")
        seed: int = Field(0, description="activation: seeds the window draws.")
        allocator: Literal["uniform", "global"] = Field(
            "uniform", description="'uniform': every group loses the same share of units; 'global': one ranking of "
            "standardised scores over all groups under the parameter budget."
        )
        granularity: Literal["coarsest", "all"] = Field(
            "coarsest", description="'coarsest': where groups overlap (heads and head dims on the same weights), "
            "prune only the widest; 'all': every prunable group."
        )
        min_units: int = Field(1, ge=1, description="Units every group keeps.")
        resizable_io: list[str] = Field(
            default_factory=lambda: ["past_key_values.*", "present.*"],
            description="Graph inputs/outputs (glob patterns) whose channel sizes may change with pruning "
            "(a KV cache); every other graph input and output is frozen.",
        )

    def __init__(self, options: "SpaPass.Options"):
        self.options = options

    def calibration_batches(self, ctx, session_inputs) -> list[dict[str, np.ndarray]]:
        """Feeds for every graph input from random windows of the calibration text."""
        from transformers import AutoTokenizer

        from compress.calibration.sources import random_windows, read_text, tokenize_text
        from compress.errors import CompressError

        o = self.options
        folder = Path(o.tokenizer).expanduser() if o.tokenizer else ctx.source.parent
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder))
        except Exception:
            raise CompressError(f"tokenizer: no tokenizer in {folder} (importance: activation needs one to read "
                                "the calibration text; set `tokenizer:` to its folder)") from None
        windows = random_windows(tokenize_text(tokenizer, read_text(o.source)), o.samples, o.seqlen, o.seed).numpy()
        batches = []
        for start in range(0, len(windows), o.batch_size):
            ids = windows[start:start + o.batch_size].astype(np.int64)
            b, t = ids.shape
            feeds = {}
            for value in session_inputs:
                if value.name == "input_ids":
                    feeds[value.name] = ids
                elif value.name == "attention_mask":
                    feeds[value.name] = np.ones((b, t), np.int64)
                elif value.name == "token_type_ids":
                    feeds[value.name] = np.zeros((b, t), np.int64)
                elif value.name == "position_ids":
                    feeds[value.name] = np.tile(np.arange(t, dtype=np.int64), (b, 1))
                elif value.name.startswith("past_key_values") and len(value.shape) == 4:
                    feeds[value.name] = np.zeros((b, value.shape[1], 0, value.shape[3]), np.float32)
                else:
                    raise CompressError(f"importance: activation cannot feed the graph input {value.name!r} from text")
            batches.append(feeds)
        return batches

    def scores(self, ctx, selected, tensors) -> list[torch.Tensor]:
        from compress.pruning.groups import magnitude_scores

        if self.options.importance == "magnitude":
            return [magnitude_scores(g, tensors) for g in selected]
        from passes.spa.activations import activation_scores, channel_energy, consumer_inputs

        inputs = consumer_inputs(ctx.model, selected)
        energy, rows = channel_energy(ctx.model, sorted(set(inputs.values())),
                                      lambda session_inputs: self.calibration_batches(ctx, session_inputs))
        return [activation_scores(g, tensors, energy, inputs, rows) for g in selected]

    def keep_counts(self, unit_sets, total_params: float) -> list[int]:
        from compress.pruning.allocators import allocate_pooled
        from compress.pruning.units import standardize

        o = self.options
        if o.allocator == "uniform":
            return [max(min(u.min_keep, u.size), round((1.0 - o.ratio) * u.size)) for u in unit_sets]
        for units in unit_sets:
            units.scores = standardize(units.scores)
        return allocate_pooled(unit_sets, (1.0 - o.ratio) * total_params)

    def run(self, ctx: OnnxPassContext) -> PlanStep:
        from onnx import numpy_helper

        from compress.errors import CompressError
        from compress.pruning.units import UnitSet
        from passes.spa.grouping import find_groups
        from passes.spa.surgery import prune_onnx

        o = self.options
        groups, graph = find_groups(ctx.model, tuple(o.resizable_io))
        selected = select_groups(groups, o.granularity)
        if not selected:
            raise CompressError(f"{ctx.source}: no prunable group (every group is frozen; `compress inspect "
                                f"{ctx.source}` says why)")
        tensors = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy())
                   for i in ctx.model.graph.initializer if i.name in {s.tensor for g in selected for s in g.slices}}
        shapes = graph.initializer_shapes
        unit_sets = [UnitSet(layer=g.id, kind="group", scores=score, cost=g.unit_cost(shapes), min_keep=o.min_units)
                     for g, score in zip(selected, self.scores(ctx, selected, tensors))]
        total = sum(u.size * u.cost for u in unit_sets)
        counts = self.keep_counts(unit_sets, total)
        keep = {g.id: u.kept_units(n) for g, u, n in zip(selected, unit_sets, counts)}
        ctx.model = prune_onnx(ctx.model, groups, graph, keep)
        removed = sum((u.size - n) * u.cost for u, n in zip(unit_sets, counts))
        details = {
            "importance": o.importance,
            "groups_found": len(groups),
            "groups_prunable": sum(g.prunable for g in groups),
            "groups_pruned": sum(n < u.size for u, n in zip(unit_sets, counts)),
            "selected_params": total,
            "removed_params": removed,
            "removed_fraction_of_selected": removed / total if total else 0.0,
            "groups": [{**g.to_dict(), "keep": keep[g.id]} for g in selected if len(keep[g.id]) < g.units],
        }
        return PlanStep(self.name, o.model_dump(), layers=[], details=details)
