"""token_prune and token_merge: token reduction baked into an encoder's forward (and its ONNX graph).

Both are data-free rewrites with static token counts (see compress/models/token_pruning.py for the
ops and docs/tokens.md for the methods): the pass only decides where the stages go and how many
tokens each keeps, records that in the model config (``token_pruning``) and the plan, and the
export carries it.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from compress.errors import CompressError
from compress.plan import PlanStep
from compress.registry import register_pass


def _encoder_adapter(ctx, pass_name: str):
    from compress.models.encoder import EncoderAdapter

    adapter = ctx.adapter()
    if not isinstance(adapter, EncoderAdapter) or adapter.family == "clip_text_model":
        raise CompressError(f"{pass_name} rewrites BERT-family text encoders and ViT, DeiT, DINOv2 and CLIP vision "
                            f"towers; got {type(ctx.model).__name__}")
    return adapter


def _free_tokens(adapter, ctx) -> int | None:
    """Patches of an image tower at the size it is fed; None for text (the length varies)."""
    if adapter.modality != "image":
        return None
    from compress.calibration.encoder_data import image_size
    from compress.pruning.token_schedule import image_tokens

    return image_tokens(adapter, image_size(adapter))


def _layers(requested: Optional[list[int]], num_layers: int, default: list[int], pass_name: str) -> list[int]:
    layers = sorted(index % num_layers for index in requested) if requested else default
    if len(set(layers)) != len(layers):
        raise CompressError(f"{pass_name}.layers: each layer at most once, got {requested}")
    return layers


def _step(pass_name: str, options: BaseModel, spec: dict, stages: list[dict], adapter, free_tokens) -> PlanStep:
    from compress.pruning.token_schedule import kept_tokens

    step = PlanStep(pass_name=pass_name, options=options.model_dump(), layers=[])
    step.details = {"token_stages": stages, "token_pruning": spec}
    if free_tokens is not None:
        step.details.update(tokens_in=free_tokens + spec["protected"],
                            tokens_out=kept_tokens(spec, free_tokens) + spec["protected"])
    return step


@register_pass("token_prune")
class TokenPrunePass:
    """Token pruning baked into the graph: keep the top-k tokens by [CLS] attention, or a diverse subset.

    'cls_topk' (EViT / FasterVLM; with score_layers > 1 the VTC-CLS multi-layer ensemble) keeps, after
    each stage layer, the tokens the CLS query attends to most (mean over heads, only the CLS row is
    computed); 'divprune' keeps a max-min diverse subset (greedy farthest points under cosine
    distance, unrolled). CLS (and DeiT's distillation token) always stay; kept tokens stay in order.
    """

    needs_calibration = False

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")

        method: Literal["cls_topk", "divprune"] = Field("cls_topk", description="How tokens are chosen (see above).")
        keep_ratio: float = Field(gt=0, le=1, description="Share of the patch / word tokens left after the last stage.")
        layers: Optional[list[int]] = Field(
            None, description="Prune after these layers (0-based; negative counts from the end); each stage keeps "
            "keep_ratio^(1/stages). Default: after layers L/4, L/2, 3L/4 (EViT's 3, 6, 9 of 12).")
        score_layers: int = Field(1, ge=1, description="cls_topk: sum the CLS attention of this many layers ending at "
                                  "the stage layer (VTC-CLS); 1 = that layer's attention only.")

    def __init__(self, options: "TokenPrunePass.Options"):
        self.options = options

    def run(self, ctx) -> PlanStep:
        from compress.pruning.token_schedule import default_stage_layers, install_token_pruning, selection_stages

        o = self.options
        adapter = _encoder_adapter(ctx, self.name)
        free_tokens = _free_tokens(adapter, ctx)
        if o.method == "divprune" and free_tokens is None:
            raise CompressError("token_prune.method: divprune unrolls one step per kept token, so it needs a fixed "
                                "token count (image towers); text encoders take cls_topk or token_merge")
        layers = _layers(o.layers, adapter.num_layers, default_stage_layers(adapter.num_layers), self.name)
        stages = selection_stages(o.method, o.keep_ratio, layers, free_tokens, o.score_layers)
        spec = install_token_pruning(ctx.model, stages)
        return _step(self.name, o, spec, stages, adapter, free_tokens)


@register_pass("token_merge")
class TokenMergePass:
    """ToMe token merging baked into the graph: bipartite soft matching after every layer from start_layer.

    Each stage splits the tokens alternately into A and B, matches every A token to its most similar B
    token (cosine of the layer's keys averaged over heads) and merges the r best-matched A tokens into
    their B token by size-weighted average, as one-hot MatMuls (no scatter). With proportional
    attention every later layer adds log(token size) to its attention logits.
    """

    needs_calibration = False

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")

        keep_ratio: float = Field(gt=0, lt=1, description="Share of the patch / word tokens left after the last merge.")
        start_layer: int = Field(0, ge=0, description="First layer after which tokens merge; every later layer but "
                                 "the last merges the same number r.")
        layers: Optional[list[int]] = Field(None, description="Merge after exactly these layers instead.")
        proportional_attention: bool = Field(True, description="Add log(size) of merged tokens to attention logits.")

    def __init__(self, options: "TokenMergePass.Options"):
        self.options = options

    def run(self, ctx) -> PlanStep:
        from compress.pruning.token_schedule import install_token_pruning, merge_stages

        o = self.options
        adapter = _encoder_adapter(ctx, self.name)
        free_tokens = _free_tokens(adapter, ctx)
        last = adapter.num_layers - 1
        if o.layers is None and o.start_layer >= last:
            raise CompressError(f"token_merge.start_layer: must be below the last layer {last}, got {o.start_layer}")
        layers = _layers(o.layers, adapter.num_layers, list(range(o.start_layer, last)), self.name)
        stages = merge_stages(o.keep_ratio, layers, free_tokens)
        spec = install_token_pruning(ctx.model, stages, proportional_attention=o.proportional_attention)
        return _step(self.name, o, spec, stages, adapter, free_tokens)
