"""token_prune and token_merge: token reduction baked into an encoder's forward (and its ONNX graph).

Both are data-free rewrites with static token counts (see compress/models/token_pruning.py for the
ops and docs/tokens.md for the methods): the pass only decides where the stages go and how many
tokens each keeps, records that in the model config (``token_pruning``) and the plan, and the
export carries it.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from compress.errors import CompressError
from compress.plan import PlanStep
from compress.registry import register_pass


def _target(ctx, pass_name: str):
    """("llava", None) for a LLaVA-style model, else ("encoder", its EncoderAdapter)."""
    from compress.models.encoder import EncoderAdapter
    from compress.pruning.token_schedule import is_llava

    if is_llava(ctx.model):
        return "llava", None
    try:
        adapter = ctx.adapter()
    except CompressError:
        adapter = None
    if not isinstance(adapter, EncoderAdapter) or adapter.family == "clip_text_model":
        raise CompressError(f"{pass_name} rewrites BERT-family text encoders, ViT, DeiT, DINOv2 and CLIP vision "
                            f"towers, and LLaVA-style models; got {type(ctx.model).__name__}")
    return "encoder", adapter


def _free_tokens(adapter) -> int | None:
    """Patches of an image tower at the size it is fed; None for text (the length varies)."""
    if adapter.modality != "image":
        return None
    from compress.calibration.encoder_data import image_size
    from compress.pruning.token_schedule import image_tokens

    return image_tokens(adapter, image_size(adapter))


def _keep_ratio(options, free_tokens: int | None, pass_name: str) -> float:
    """keep_ratio, or keep / free tokens when the pass was given a token count."""
    if options.keep is None:
        return options.keep_ratio
    if free_tokens is None:
        raise CompressError(f"{pass_name}.keep: a token count needs a fixed number of tokens (image towers, "
                            "LLaVA); text encoders take keep_ratio")
    if options.keep >= free_tokens:
        raise CompressError(f"{pass_name}.keep: {options.keep} is not fewer than the {free_tokens} patch tokens")
    return options.keep / free_tokens


def _layers(requested: Optional[list[int]], num_layers: int, default: list[int], pass_name: str) -> list[int]:
    layers = sorted(index % num_layers for index in requested) if requested else default
    if len(set(layers)) != len(layers):
        raise CompressError(f"{pass_name}.layers: each layer at most once, got {requested}")
    return layers


def _step(pass_name: str, options: BaseModel, spec: dict, stages: list[dict], tokens_in, tokens_out) -> PlanStep:
    step = PlanStep(pass_name=pass_name, options=options.model_dump(), layers=[])
    step.details = {"token_stages": stages, "token_pruning": spec}
    if tokens_in is not None:
        step.details.update(tokens_in=tokens_in, tokens_out=tokens_out)
    if spec.get("post_projector"):
        step.details["post_projector"] = spec["post_projector"]
    return step


class _CountOptions(BaseModel):
    """How many tokens are left: a share (any encoder) or a count (fixed token counts only)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    keep_ratio: Optional[float] = Field(None, gt=0, le=1, description="Share of the patch / word tokens left after "
                                        "the last stage.")
    keep: Optional[int] = Field(None, ge=1, description="Patch tokens left after the last stage (image towers and "
                                "LLaVA; FasterVLM's k), instead of keep_ratio.")

    @model_validator(mode="after")
    def _one_count(self):
        if (self.keep is None) == (self.keep_ratio is None):
            raise ValueError("give exactly one of keep_ratio or keep")
        return self


@register_pass("token_prune")
class TokenPrunePass:
    """Token pruning baked into the graph: keep the top-k tokens by [CLS] attention, or a diverse subset.

    'cls_topk' (EViT / FasterVLM; with score_layers > 1 the VTC-CLS multi-layer ensemble) keeps, after
    each stage layer, the tokens the CLS query attends to most (mean over heads, only the CLS row is
    computed); 'divprune' keeps a max-min diverse subset (greedy farthest points under cosine
    distance, unrolled). CLS (and DeiT's distillation token) always stay; kept tokens stay in order.
    """

    kinds = ("encoder", "vlm")  # the model kinds it works on (compress.kinds)
    needs_calibration = False

    class Options(_CountOptions):
        method: Literal["cls_topk", "divprune"] = Field("cls_topk", description="How tokens are chosen (see above).")
        layers: Optional[list[int]] = Field(
            None, description="Prune after these layers (0-based; negative counts from the end); each stage keeps "
            "keep_ratio^(1/stages). Default: after layers L/4, L/2, 3L/4 (EViT's 3, 6, 9 of 12); in a LLaVA model, "
            "after the layer whose hidden state feeds the projector (FasterVLM).")
        score_layers: int = Field(1, ge=1, description="cls_topk: sum the CLS attention of this many layers ending at "
                                  "the stage layer (VTC-CLS); 1 = that layer's attention only.")
        placement: Literal["auto", "tower", "projector"] = Field(
            "auto", description="LLaVA, divprune: select among the tower's tokens before the projector ('tower') or "
            "among the projected tokens the language model reads ('projector', DivPrune's choice; what auto means "
            "there). Encoders: tower only.")

    def __init__(self, options: "TokenPrunePass.Options"):
        self.options = options

    def run(self, ctx) -> PlanStep:
        from compress.pruning.token_schedule import default_stage_layers, install_token_pruning, selection_stages

        o = self.options
        kind, adapter = _target(ctx, self.name)
        if kind == "llava":
            return self._run_llava(ctx)
        if o.placement == "projector":
            raise CompressError("token_prune.placement: 'projector' is for LLaVA-style models; an encoder has no "
                                "projector")
        free_tokens = _free_tokens(adapter)
        if o.method == "divprune" and free_tokens is None:
            raise CompressError("token_prune.method: divprune unrolls one step per kept token, so it needs a fixed "
                                "token count (image towers); text encoders take cls_topk or token_merge")
        keep_ratio = _keep_ratio(o, free_tokens, self.name)
        layers = _layers(o.layers, adapter.num_layers, default_stage_layers(adapter.num_layers), self.name)
        stages = selection_stages(o.method, keep_ratio, layers, free_tokens, o.score_layers)
        spec = install_token_pruning(ctx.model, stages)
        return _encoder_step(self.name, o, spec, stages, free_tokens)

    def _run_llava(self, ctx) -> PlanStep:
        from compress.pruning.token_schedule import (
            install_llava_token_pruning,
            llava_feature_layers,
            llava_patches,
            selection_stages,
        )

        o, model = self.options, ctx.model
        patches, used = llava_patches(model), llava_feature_layers(model)
        keep_ratio = _keep_ratio(o, patches, self.name)
        if o.method == "divprune" and o.placement != "tower":
            if o.layers is not None:
                raise CompressError("token_prune.layers: a post-projector selection has no tower layers; use "
                                    "placement: tower to select inside the tower")
            stages, post = [], {"method": "divprune", "keep": max(1, round(patches * keep_ratio))}
        else:
            layers = _layers(o.layers, used, [used - 1], self.name)
            stages, post = selection_stages(o.method, keep_ratio, layers, patches, o.score_layers), None
        spec = install_llava_token_pruning(model, stages, post)
        return _llava_step(self.name, o, spec, stages, model)


def _encoder_step(pass_name, options, spec, stages, free_tokens) -> PlanStep:
    from compress.pruning.token_schedule import kept_tokens

    if free_tokens is None:
        return _step(pass_name, options, spec, stages, None, None)
    protected = spec["protected"]
    return _step(pass_name, options, spec, stages, free_tokens + protected, kept_tokens(spec, free_tokens) + protected)


def _llava_step(pass_name, options, spec, stages, model) -> PlanStep:
    """Tokens in / out = image tokens per image the language model reads, before and after."""
    from compress.pruning.token_schedule import image_tokens_out

    return _step(pass_name, options, spec, stages, image_tokens_out(model, {"stages": []}),
                 model.config.image_seq_length)


@register_pass("token_merge")
class TokenMergePass:
    """ToMe token merging baked into the graph: bipartite soft matching after every layer from start_layer.

    Each stage splits the tokens alternately into A and B, matches every A token to its most similar B
    token (cosine of the layer's keys averaged over heads) and merges the r best-matched A tokens into
    their B token by size-weighted average, as one-hot MatMuls (no scatter). With proportional
    attention every later layer adds log(token size) to its attention logits. In a LLaVA model the
    merges run inside the vision tower, up to the layer that feeds the projector.
    """

    kinds = ("encoder", "vlm")  # the model kinds it works on (compress.kinds)
    needs_calibration = False

    class Options(_CountOptions):
        start_layer: int = Field(0, ge=0, description="First layer after which tokens merge; every later layer but "
                                 "the last merges the same number r.")
        layers: Optional[list[int]] = Field(None, description="Merge after exactly these layers instead.")
        proportional_attention: bool = Field(True, description="Add log(size) of merged tokens to attention logits.")

    def __init__(self, options: "TokenMergePass.Options"):
        self.options = options

    def run(self, ctx) -> PlanStep:
        from compress.pruning.token_schedule import (
            install_llava_token_pruning,
            install_token_pruning,
            llava_feature_layers,
            llava_patches,
            merge_stages,
        )

        o = self.options
        kind, adapter = _target(ctx, self.name)
        if kind == "llava":
            free_tokens, num_layers = llava_patches(ctx.model), llava_feature_layers(ctx.model)
        else:
            free_tokens, num_layers = _free_tokens(adapter), adapter.num_layers
        keep_ratio = _keep_ratio(o, free_tokens, self.name)
        if keep_ratio >= 1:
            raise CompressError(f"{self.name}.keep_ratio: 1 merges no token; give a share below 1")
        last = num_layers - 1
        if o.layers is None and o.start_layer >= last:
            raise CompressError(f"token_merge.start_layer: must be below the last layer {last}, got {o.start_layer}")
        layers = _layers(o.layers, num_layers, list(range(o.start_layer, last)), self.name)
        stages = merge_stages(keep_ratio, layers, free_tokens)
        if kind == "llava":
            spec = install_llava_token_pruning(ctx.model, stages, proportional_attention=o.proportional_attention)
            return _llava_step(self.name, o, spec, stages, ctx.model)
        spec = install_token_pruning(ctx.model, stages, proportional_attention=o.proportional_attention)
        return _encoder_step(self.name, o, spec, stages, free_tokens)
