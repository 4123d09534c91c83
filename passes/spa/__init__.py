"""The ``spa`` pass, declared: name, options and what it needs (light; run by passes.spa.prune)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from compress.recipe import TextSource
from compress.registry import register_pass
from compress.schema import Seed


@register_pass("spa", implementation="passes.spa.prune:SpaPass")
class Spa:
    """SPA: structured pruning of any ONNX model through the coupled-channel groups of its graph.

    Groups are found by propagating channel dependencies through the graph with one rule per op
    (anything not understood is frozen); each unit of a group is scored by its weights' magnitude;
    the allocator keeps the strongest units under the budget; initializers are sliced and the
    Reshape/Expand literals that count the pruned units are patched.
    """

    kinds = ("onnx",)  # the model kinds it works on (compress.kinds)
    needs_calibration = False
    model_format = "onnx"

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

        ratio: float = Field(
            gt=0.0, lt=1.0, description="'uniform': the share of units every group loses; 'global': the share of "
            "the selected groups' parameters (counted per group) to remove. A weight read and written by two "
            "pruned groups loses both shares, so the parameters removed can exceed the ratio (see the report)."
        )
        importance: Literal["magnitude", "activation", "obs"] = Field(
            "magnitude", description="Unit score. 'magnitude' (data-free): group L2 magnitude of the producer and "
            "consumer weights, each tensor normalised by its mean. 'activation': Wanda-sp on the graph, "
            "‖consumer weight row‖ · RMS of the activation it reads, measured with ONNX Runtime on calibration text. "
            "'obs' (OBSPA, experimental): Optimal-Brain-Surgeon error of removing the unit from its consumers, "
            "with the Hessian chosen by `hessian`."
        )
        hessian: Literal["identity", "synthetic", "calibration"] = Field(
            "synthetic", description="Where OBS's input Hessian H = Σ x xᵀ comes from (importance obs, compensation "
            "obs). 'identity': H = I, weights only. 'synthetic' (data-free): random token ids (standard-normal "
            "float inputs) run through the model, seeded. 'calibration': windows of `source`."
        )
        compensation: Optional[Literal["none", "obs"]] = Field(
            None, description="'obs': refit each consumer's kept input columns by least squares under H "
            "(W'[:, K] = (W·H)[:, K]·H[K, K]⁻¹), so the kept channels take over what the removed ones carried. "
            "Default: obs when importance is obs, else none."
        )
        damp: float = Field(0.01, gt=0.0, description="OBS: H += damp · mean(diag H) · I before inverting.")
        source: TextSource = Field("austen", description="activation, hessian calibration: calibration text.")
        tokenizer: Optional[str] = Field(
            None, description="activation, hessian calibration: folder with the model's tokenizer (default: the "
            "ONNX file's folder)."
        )
        samples: int = Field(32, ge=1, description="activation, synthetic or calibration Hessian: sequences run.")
        seqlen: int = Field(128, ge=2, description="activation, synthetic or calibration Hessian: tokens per sequence.")
        batch_size: int = Field(8, ge=1, description="Sequences per ONNX Runtime call.")
        seed: Seed = Field(0, description="Seeds the window draws and the synthetic inputs.")
        allocator: Literal["uniform", "global"] = Field(
            "uniform", description="'uniform': every group loses the same share of units; 'global': one ranking of "
            "standardised scores over all groups under the parameter budget."
        )
        standardize: Literal["group", "kind"] = Field(
            "group", description="allocator global: 'group' z-scores each group's units alone (per layer, as FLAP "
            "does), so every group keeps its own scale; 'kind' z-scores all groups of one kind together (same unit "
            "count and cost: every layer's KV groups, every layer's MLP channels), so layers compete on raw scores. "
            "On SmolLM2 'kind' is much worse: its scores span orders of magnitude between layers (20%: PPL 13,070 "
            "against 146.7 for activation importance)."
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
