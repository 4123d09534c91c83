"""Token-pruning stages: where they go, how many tokens each keeps, and installing them on a model.

A *stage* is one entry of a config's ``token_pruning["stages"]`` (see
`compress.models.token_pruning`). Image towers have a fixed token count, so every stage gets an
integer count here; text encoders get a fraction of the current (padded) length instead.
"""

from __future__ import annotations

from fractions import Fraction

from torch import nn

from compress.errors import CompressError
from compress.models.encoder import EncoderAdapter
from compress.models.pruned_encoder import PRUNED_CLASSES, PRUNED_MODEL_TYPES
from compress.models.token_pruning import PROTECTED_TOKENS, check_token_pruning, stage_count


def protected_tokens(adapter: EncoderAdapter) -> int:
    """Leading tokens no stage may drop or merge: CLS (and DeiT's distillation token, DINOv2's registers)."""
    return PROTECTED_TOKENS[adapter.family] + int(getattr(adapter.config, "num_register_tokens", 0) or 0)


def default_stage_layers(num_layers: int) -> list[int]:
    """EViT's placement scaled to the depth: after layers L/4, L/2 and 3L/4 (3, 6, 9 of 12)."""
    return sorted({max(0, min(num_layers - 2, num_layers * quarter // 4)) for quarter in (1, 2, 3)})


def _fraction(value: float) -> list[int]:
    ratio = Fraction(value).limit_denominator(1000)
    return [ratio.numerator, ratio.denominator]


def image_tokens(adapter: EncoderAdapter, image_size: int) -> int:
    """Free (non-protected) tokens of an image tower at ``image_size``²: its patches."""
    patch = adapter.config.patch_size
    return (image_size // patch) ** 2


def selection_stages(method: str, keep_ratio: float, layers: list[int], free_tokens: int | None,
                     score_layers: int = 1) -> list[dict]:
    """cls_topk / divprune stages after each of ``layers``, together keeping ``keep_ratio`` of the
    free tokens: stage s of S keeps round(N · keep_ratio^(s/S)) for N fixed tokens, or, when
    ``free_tokens`` is None (text), ceil(N0 · keep_ratio^(s/S)) of the input's N0 tokens."""
    stages, previous = [], -1
    for number, layer in enumerate(layers, start=1):
        stage = {"method": method, "after_layer": layer}
        if free_tokens is None:
            stage["keep_fraction"] = _fraction(keep_ratio ** (number / len(layers)))
        else:
            stage["keep"] = max(1, round(free_tokens * keep_ratio ** (number / len(layers))))
        if method == "cls_topk":
            stage["score_layers"] = list(range(max(previous + 1, layer - score_layers + 1), layer + 1))
        stages.append(stage)
        previous = layer
    return stages


def merge_stages(keep_ratio: float, layers: list[int], free_tokens: int | None) -> list[dict]:
    """ToMe stages after each of ``layers`` merging, together, all but ``keep_ratio`` of the free
    tokens: the same r after every layer (the first layers take the remainder) for fixed tokens, or,
    for text, stage s of S leaves ceil(N0 · keep_ratio^(s/S)) of the input's N0 tokens. A stage can
    merge at most half of the tokens it sees."""
    if free_tokens is None:
        per_layer = 1 - keep_ratio ** (1 / len(layers))
        if per_layer > 0.5:
            raise CompressError(f"token_merge: keep_ratio {keep_ratio} over {len(layers)} layers merges "
                                f"{per_layer:.2f} of the tokens per layer; at most 0.5 is possible (start earlier)")
        return [{"method": "tome", "after_layer": layer,
                 "keep_fraction": _fraction(keep_ratio ** (number / len(layers)))}
                for number, layer in enumerate(layers, start=1)]
    total = free_tokens - max(1, round(free_tokens * keep_ratio))
    if total == 0:
        raise CompressError(f"token_merge: keep_ratio {keep_ratio} of {free_tokens} tokens merges none")
    stages, remaining = [], free_tokens
    for number, layer in enumerate(layers):
        merge = total // len(layers) + (1 if number < total % len(layers) else 0)
        if merge == 0:  # fewer merges than layers: the first layers take one each
            break
        if merge > remaining // 2:
            raise CompressError(f"token_merge: merging {merge} of {remaining} tokens after layer {layer} is more than "
                                f"half; keep more tokens or merge over more layers")
        stages.append({"method": "tome", "after_layer": layer, "merge": merge})
        remaining -= merge
    return stages


def install_token_pruning(model: nn.Module, stages: list[dict], proportional_attention: bool = True) -> dict:
    """Add ``stages`` to ``model``'s token rewrite (after any stages already there) and switch the
    model to its pruned class, whose forward runs the rewrite. Returns the whole ``token_pruning``."""
    adapter = EncoderAdapter(model)
    config = model.config
    current = getattr(config, "token_pruning", None) or {"stages": []}
    spec = {"protected": protected_tokens(adapter),
            "proportional_attention": bool(current.get("proportional_attention", proportional_attention)
                                           if current["stages"] else proportional_attention),
            "stages": [dict(stage) for stage in current["stages"]] + [dict(stage) for stage in stages]}
    try:
        check_token_pruning(spec, adapter.num_layers)
    except ValueError as error:
        raise CompressError(str(error)) from None
    for stage in spec["stages"]:
        for layer in stage.get("score_layers") or ([stage["after_layer"]] if stage["method"] != "divprune" else []):
            if adapter.widths(layer).heads == 0:
                raise CompressError(f"token pruning scores tokens with layer {layer}'s attention, which has no heads left")
    if config.model_type not in PRUNED_MODEL_TYPES:
        config.base_model_type = adapter.family
        model.__class__ = PRUNED_CLASSES[adapter.family][1]
    config.token_pruning = spec
    return spec


def kept_tokens(spec: dict, free_tokens: int) -> int:
    """Free tokens left after every stage of ``spec`` for an input with ``free_tokens`` of them."""
    count = free_tokens
    for stage in spec["stages"]:
        counted = stage_count(stage, count, free_tokens)
        count = count - counted if stage["method"] == "tome" else counted
    return count


# ------------------------------------------------------------------------------------ LLaVA
def is_llava(model: nn.Module) -> bool:
    """A LLaVA-style VLM (stock or with pruned image tokens)."""
    return getattr(model.config, "model_type", None) in ("llava", "pruned_llava")


def llava_patches(model: nn.Module) -> int:
    """Patch tokens the vision tower makes of one image (CLS excluded)."""
    vision = model.config.vision_config
    if vision.model_type != "clip_vision_model":
        raise CompressError(f"token pruning in a LLaVA model needs a CLIP vision tower; this one is "
                            f"{vision.model_type}")
    return (vision.image_size // vision.patch_size) ** 2


def llava_feature_layers(model: nn.Module) -> int:
    """How many tower layers LLaVA runs to get the hidden state its projector reads."""
    from compress.models.pruned_llava import tower_layers_used

    config = model.config
    if not isinstance(config.vision_feature_layer, int):
        raise CompressError("token pruning in a LLaVA model needs one vision_feature_layer, not a list")
    return tower_layers_used(config.vision_config, config.vision_feature_layer)


def image_tokens_out(model: nn.Module, spec: dict) -> int:
    """Image tokens per image that a LLaVA model with ``spec`` gives its language model."""
    count = kept_tokens(spec, llava_patches(model))
    if model.config.vision_feature_select_strategy != "default":
        count += 1  # 'full' keeps CLS
    post = spec.get("post_projector")
    return min(count, int(post["keep"])) if post else count


def install_llava_token_pruning(model: nn.Module, stages: list[dict], post_projector: dict | None = None,
                                proportional_attention: bool = True) -> dict:
    """Add ``stages`` (tower stages) and ``post_projector`` to a LLaVA model's image-token rewrite,
    switch it to the ``pruned_llava`` classes and set ``image_seq_length`` to the new image token
    count. Returns the whole ``token_pruning``."""
    from compress.models.pruned_llava import (
        PrunedLlavaConfig,
        PrunedLlavaForConditionalGeneration,
        PrunedLlavaModel,
        check_vlm_token_pruning,
    )

    config = model.config
    current = getattr(config, "token_pruning", None) or {"stages": []}
    if post_projector is not None and current.get("post_projector"):
        raise CompressError("this LLaVA model already selects tokens after its projector; run one post-projector "
                            "selection only")
    spec = {"protected": 1,
            "proportional_attention": bool(current.get("proportional_attention", proportional_attention)
                                           if current["stages"] else proportional_attention),
            "stages": [dict(stage) for stage in current["stages"]] + [dict(stage) for stage in stages],
            "post_projector": post_projector or current.get("post_projector")}
    try:
        check_vlm_token_pruning(spec, config.vision_config, llava_feature_layers(model))
    except ValueError as error:
        raise CompressError(str(error)) from None
    if spec["post_projector"] and spec["post_projector"]["keep"] > image_tokens_out(model, {**spec, "post_projector": None}):
        raise CompressError(f"token_prune: the post-projector selection keeps {spec['post_projector']['keep']} tokens, "
                            f"more than the tower gives")
    config.__class__ = PrunedLlavaConfig
    config.token_pruning = spec
    config.image_seq_length = image_tokens_out(model, spec)
    model.__class__ = PrunedLlavaForConditionalGeneration
    model.model.__class__ = PrunedLlavaModel
    return spec
