"""The ``token_prune`` and ``token_merge`` passes, declared: names, options and what they need (light; run
by passes.tokens)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from compress.registry import register_pass


class CountOptions(BaseModel):
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


@register_pass("token_prune", implementation="passes.tokens.run:TokenPrunePass")
class TokenPrune:
    """Token pruning baked into the graph: keep the top-k tokens by [CLS] attention, or a diverse subset.

    'cls_topk' (EViT / FasterVLM; with score_layers > 1 the VTC-CLS multi-layer ensemble) keeps, after
    each stage layer, the tokens the CLS query attends to most (mean over heads, only the CLS row is
    computed); 'divprune' keeps a max-min diverse subset (greedy farthest points under cosine
    distance, unrolled). CLS (and DeiT's distillation token) always stay; kept tokens stay in order.
    """

    kinds = ("encoder", "vlm")  # the model kinds it works on (compress.kinds)
    needs_calibration = False

    class Options(CountOptions):
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


@register_pass("token_merge", implementation="passes.tokens.run:TokenMergePass")
class TokenMerge:
    """ToMe token merging baked into the graph: bipartite soft matching after every layer from start_layer.

    Each stage splits the tokens alternately into A and B, matches every A token to its most similar B
    token (cosine of the layer's keys averaged over heads) and merges the r best-matched A tokens into
    their B token by size-weighted average, as one-hot MatMuls (no scatter). With proportional
    attention every later layer adds log(token size) to its attention logits. In a LLaVA model the
    merges run inside the vision tower, up to the layer that feeds the projector.
    """

    kinds = ("encoder", "vlm")  # the model kinds it works on (compress.kinds)
    needs_calibration = False

    class Options(CountOptions):
        start_layer: int = Field(0, ge=0, description="First layer after which tokens merge; every later layer but "
                                 "the last merges the same number r.")
        layers: Optional[list[int]] = Field(None, description="Merge after exactly these layers instead.")
        proportional_attention: bool = Field(True, description="Add log(size) of merged tokens to attention logits.")
