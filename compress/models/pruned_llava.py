"""LLaVA-style vision-language models whose image tokens are pruned before the language model.

FasterVLM's placement: the vision tower (a CLIP vision transformer) runs up to the layer whose
hidden state LLaVA feeds its projector (``vision_feature_layer``, -2 in LLaVA-1.5); the rewrite
(`token_pruning.run_layers`) keeps k of its patch tokens, scored by that layer's own [CLS]
attention (``cls_topk``; summed over several layers for VTC-CLS) or chosen for diversity; the
projector maps the k kept tokens, and the language model receives k image embeddings instead of
N. ``post_projector`` instead (or also) selects a diverse subset of the projected tokens (DivPrune's
own placement, at the language model's input). The tower layers after the feature layer are never
used by LLaVA, so they are not run.

Self-contained on purpose (torch, transformers and the two sibling files token_pruning.py and
pruned_encoder.py): the exporter copies all three beside the weights, so the folder loads with
``trust_remote_code=True`` without `compress`; importing this module (``import compress`` does)
registers ``pruned_llava`` with `AutoConfig` and `AutoModelForImageTextToText`.

Config: ``token_pruning`` = {"protected": 1, "proportional_attention": bool, "stages": [tower stages,
as for encoders, after layers below the feature layer's index], "post_projector": {"method":
"divprune", "keep": k} | None}, and ``image_seq_length`` = k, the image placeholders per image.

Shapes: pixel_values [B, 3, S, S] -> image features [B, k, D_text] and kept positions [B, k]
(original token indices of the tower: 0 is CLS, patch p is p + 1).
"""

from __future__ import annotations

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModelForImageTextToText, LlavaConfig, LlavaForConditionalGeneration, LlavaModel
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import TRANSFORMERS_DYNAMIC_MODULE_NAME

from .pruned_encoder import LAYOUTS
from .token_pruning import _embed, _TokenState, check_token_pruning, max_min_diverse_index, run_layers

TOWER_FAMILY = "clip_vision_model"


def tower_layers_used(vision_config, feature_layer: int) -> int:
    """How many tower layers produce ``hidden_states[feature_layer]`` (hidden_states[0] = embeddings)."""
    layers = vision_config.num_hidden_layers
    if not -(layers + 1) <= feature_layer <= layers:
        raise ValueError(f"vision_feature_layer {feature_layer} is outside the tower's {layers + 1} hidden states")
    return feature_layer % (layers + 1)


def check_vlm_token_pruning(spec: dict, vision_config, feature_layer: int) -> None:
    """ValueError naming the problem when ``spec`` cannot run before LLaVA's projector."""
    used = tower_layers_used(vision_config, feature_layer)
    check_token_pruning(spec, used)
    post = spec.get("post_projector")
    if post is not None and (post.get("method") != "divprune" or not isinstance(post.get("keep"), int)
                             or post["keep"] < 1):
        raise ValueError(f"token_pruning.post_projector must be {{'method': 'divprune', 'keep': k >= 1}}, got {post!r}")


def pruned_image_features(tower: nn.Module, projector: nn.Module, pixel_values: torch.Tensor, spec: dict,
                          feature_layer: int, strategy: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(image features [B, k, D_text], kept positions [B, k]) with ``spec``'s rewrite; ``strategy``
    'default' drops CLS after the tower (as LLaVA does), 'full' keeps it."""
    layout = LAYOUTS[TOWER_FAMILY]
    layers = tower.get_submodule(layout.layers)[: tower_layers_used(tower.config, feature_layer)]
    hidden, sizes = _embed(tower, TOWER_FAMILY, pixel_values=pixel_values)
    positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0).expand(hidden.shape[0], -1)
    state = run_layers(layers, _TokenState(hidden, sizes, positions), spec, layout, TOWER_FAMILY, tower.config)
    if strategy == "default":
        state = _TokenState(state.hidden[:, 1:], state.sizes[:, 1:], state.positions[:, 1:])
    features = projector(state.hidden)
    post = spec.get("post_projector")
    if post is not None:
        protected = 0 if strategy == "default" else 1
        index = max_min_diverse_index(features, state.sizes, int(post["keep"]), protected)
        features = features.gather(1, index.unsqueeze(-1).expand(-1, -1, features.shape[-1]))
        state = state.take(index)
    return features, state.positions


@strict
class PrunedLlavaConfig(LlavaConfig):
    """`LlavaConfig` whose image tokens are pruned before the language model (see the module docstring)."""

    model_type = "pruned_llava"
    token_pruning: dict | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.token_pruning is not None:
            check_vlm_token_pruning(self.token_pruning, self.vision_config, self.vision_feature_layer)


class PrunedLlavaModel(LlavaModel):
    """`LlavaModel` whose ``get_image_features`` returns the k kept (projected) image tokens."""

    def get_image_features(self, pixel_values, vision_feature_layer=None, vision_feature_select_strategy=None,
                           **kwargs) -> BaseModelOutputWithPooling:
        spec = self.config.token_pruning
        if not isinstance(vision_feature_layer, int) and vision_feature_layer is not None:
            raise ValueError("a token-pruned LLaVA reads one vision_feature_layer, not a list")
        layer = self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        strategy = vision_feature_select_strategy or self.config.vision_feature_select_strategy
        features, positions = pruned_image_features(self.vision_tower, self.multi_modal_projector, pixel_values,
                                                    spec or {"stages": []}, layer, strategy)
        output = BaseModelOutputWithPooling(last_hidden_state=features, pooler_output=list(features))
        output.kept_positions = positions
        return output


class PrunedLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """`LlavaForConditionalGeneration` whose language model receives ``image_seq_length`` = k
    image tokens per image."""

    config_class = PrunedLlavaConfig

    def __init__(self, config):
        super().__init__(config)
        self.model.__class__ = PrunedLlavaModel  # same modules and weights; only get_image_features differs


def _loaded_as_remote_code() -> bool:
    return __name__.startswith(f"{TRANSFORMERS_DYNAMIC_MODULE_NAME}.")


if not _loaded_as_remote_code():
    AutoConfig.register(PrunedLlavaConfig.model_type, PrunedLlavaConfig, exist_ok=True)
    AutoModelForImageTextToText.register(PrunedLlavaConfig, PrunedLlavaForConditionalGeneration, exist_ok=True)
    PrunedLlavaConfig.register_for_auto_class("AutoConfig")
    PrunedLlavaForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
