"""token_prune and token_merge: token reduction baked into an encoder's forward (and its ONNX graph).

Both are data-free rewrites with static token counts (see compress/models/token_pruning.py for the
ops and docs/tokens.md for the methods): the pass only decides where the stages go and how many
tokens each keeps, records that in the model config (``token_pruning``) and the plan, and the
export carries it.

The passes' names, options and docs are declared in :mod:`passes.tokens`; this is what runs them.
"""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel

from compress.errors import CompressError
from compress.plan import PlanStep
from passes.tokens import TokenMerge, TokenPrune


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


class TokenPrunePass(TokenPrune):
    """Runs the ``token_prune`` pass (declared by :class:`passes.tokens.TokenPrune`)."""

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


class TokenMergePass(TokenMerge):
    """Runs the ``token_merge`` pass (declared by :class:`passes.tokens.TokenMerge`)."""

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
