"""Token pruning and merging baked into an encoder's forward, with static token counts.

Self-contained on purpose (torch and the standard library only): `pruned_encoder.py` imports it
relatively and the exporter copies both files beside the weights, so a token-pruned folder reloads
with ``trust_remote_code=True`` on a machine without `compress`, and the ONNX export carries the
same rewrite because it traces this forward.

A config's ``token_pruning`` is plain JSON:

    {"protected": P,                 # leading tokens never dropped or merged (CLS, DeiT's distillation token)
     "proportional_attention": bool, # ToMe: add log(token size) to every attention logit once tokens merged
     "stages": [                     # in layer order, at most one per layer
        {"method": "cls_topk", "after_layer": L, "keep": k | None, "keep_fraction": [p, q] | None,
         "score_layers": [l0, ..., L]},            # VTC-CLS: CLS attention summed over these layers
        {"method": "divprune", "after_layer": L, "keep": k | None, "keep_fraction": [p, q] | None},
        {"method": "tome", "after_layer": L, "merge": r | None, "keep_fraction": [p, q] | None}]}

``keep`` / ``merge`` are Python ints (image towers: the token count is fixed). Text encoders use
``keep_fraction`` = p/q instead: the stage leaves ceil(N0 · p / q) free tokens, N0 being the
input's non-protected (padded) length, so that every stage's count is one integer expression of
the input length (never nested stage by stage, which torch.export cannot bound) and never depends
on data. Padding has token size 0: it is dropped first, never merged into a real token and masked
in attention. Kept tokens stay in their original order (indices sorted after TopK); ToMe's output is
[unmerged A tokens in order ; B tokens].

Every rewrite is made of TopK, Gather, MatMul and elementwise ops: no boolean indexing, nonzero,
unique or scatter-reduce; DivPrune's greedy loop is unrolled over range(k). The stage runs after
the whole layer; its scores come from that layer's own q/k projections of the layer input
(only the CLS query row is computed for CLS attention), so the layer's attention stays one call.

Shapes: hidden [B, T, E]; sizes [B, T] float (0 = padding, 1 = one token, n = n merged tokens);
positions [B, T] int64 (the original index each token came from; for a merged token, its B token's).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

METHODS = ("cls_topk", "divprune", "tome")

# stock model_type -> (the layer's pre-attention norm, or None for post-norm BERT)
ATTENTION_NORMS = {"bert": None, "vit": "layernorm_before", "deit": "layernorm_before", "dinov2": "norm1",
                   "clip_vision_model": "layer_norm1"}
# stock model_type -> leading tokens that are not patches / words (CLS, DeiT's distillation token)
PROTECTED_TOKENS = {"bert": 1, "vit": 1, "deit": 2, "dinov2": 1, "clip_vision_model": 1}


@dataclass
class TokenPrunedOutput(BaseModelOutputWithPooling):
    """``last_hidden_state`` [B, T', E] of the kept / merged tokens, ``token_sizes`` [B, T'] (0 for
    padding; pool with them as weights) and ``kept_positions`` [B, T'] (original token indices)."""

    token_sizes: torch.Tensor | None = None
    kept_positions: torch.Tensor | None = None


# ------------------------------------------------------------------------------------------ counts
def count_from_fraction(tokens, fraction) -> int:
    """ceil(tokens · p / q) for ``fraction`` = [p, q], with integer arithmetic (``tokens`` may be a
    symbolic size while tracing)."""
    p, q = int(fraction[0]), int(fraction[1])
    return (tokens * p + q - 1) // q


def stage_count(stage: dict, free_tokens, input_free_tokens) -> int:
    """Tokens the stage keeps (cls_topk, divprune) or merges away (tome), given the ``free_tokens``
    it receives and the ``input_free_tokens`` of the input (what ``keep_fraction`` is a share of).
    A merge is at most half of the tokens it sees."""
    fixed = stage.get("merge" if stage["method"] == "tome" else "keep")
    if fixed is not None:
        return fixed
    left = count_from_fraction(input_free_tokens, stage["keep_fraction"])
    if stage["method"] == "tome":
        return min(free_tokens - left, free_tokens // 2)
    return min(left, free_tokens)


# ----------------------------------------------------------------------------------------- masks
def attention_bias(sizes: torch.Tensor, proportional: bool, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention bias [B, 1, 1, T]: the lowest float for padding (size 0), log(size) for the
    others when ``proportional`` (ToMe), else 0."""
    lowest = torch.finfo(dtype).min
    valid = sizes > 0
    if proportional:
        values = sizes.clamp_min(1.0).log()
    else:
        values = torch.zeros_like(sizes)
    return torch.where(valid, values, torch.full_like(sizes, lowest)).to(dtype)[:, None, None, :]


# ---------------------------------------------------------------------------------------- scores
def _project_heads(linear: nn.Linear, states: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[B, T, E] -> [B, heads, T, head_dim]."""
    projected = linear(states)
    batch, tokens = projected.shape[0], projected.shape[1]
    return projected.view(batch, tokens, -1, head_dim).transpose(1, 2)


def cls_attention(q: nn.Linear, k: nn.Linear, states: torch.Tensor, head_dim: int,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """Attention probabilities of the CLS query row averaged over heads, [B, T] (float32 or wider).

    ``states`` [B, T, E] is what the layer's attention reads (after its pre-norm); only the CLS
    query is projected (O(T·E²) for the keys, O(T·E) for the scores)."""
    query = _project_heads(q, states[:, :1], head_dim)          # [B, H, 1, D]
    keys = _project_heads(k, states, head_dim)                  # [B, H, T, D]
    logits = (query @ keys.transpose(-1, -2)) * head_dim ** -0.5  # [B, H, 1, T]
    if bias is not None:
        logits = logits + bias
    return logits.float().softmax(-1).mean(1)[:, 0]


def key_metric(k: nn.Linear, states: torch.Tensor, head_dim: int) -> torch.Tensor:
    """ToMe's similarity metric: the layer's keys averaged over heads, [B, T, head_dim]."""
    return _project_heads(k, states, head_dim).mean(1)


# ------------------------------------------------------------------------------------- selection
def _gather_tokens(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values [B, T] or [B, T, C], index [B, K] -> [B, K] or [B, K, C]."""
    if values.dim() == 2:
        return values.gather(1, index)
    return values.gather(1, index.unsqueeze(-1).expand(-1, -1, values.shape[-1]))


def _with_protected(chosen: torch.Tensor, protected: int) -> torch.Tensor:
    """Sorted indices of the chosen free tokens [B, K] (relative to the first free token) ->
    [B, protected + K] indices into the whole sequence."""
    chosen = chosen.sort(dim=-1).values + protected
    lead = torch.arange(protected, device=chosen.device).unsqueeze(0).expand(chosen.shape[0], -1)
    return torch.cat([lead, chosen], dim=1)


def top_k_index(scores: torch.Tensor, sizes: torch.Tensor, keep: int, protected: int) -> torch.Tensor:
    """[B, protected + keep] indices: the protected tokens, then the ``keep`` free tokens with the
    highest ``scores`` [B, T] (non-negative: attention probabilities), in their original order.

    Padding ranks last, earlier padding first: distinct values, so that PyTorch and ONNX Runtime
    (whose TopK orders ties differently) keep the same padding slots, and the real tokens keep the
    same slots for later stages."""
    free_scores = scores[:, protected:].float()
    count = free_scores.shape[1]
    padding = -1.0 - torch.arange(count, device=free_scores.device, dtype=free_scores.dtype) / (count + 1)
    free_scores = torch.where(sizes[:, protected:] > 0, free_scores, padding.unsqueeze(0).expand_as(free_scores))
    return _with_protected(free_scores.topk(keep, dim=-1).indices, protected)


def max_min_diverse_index(hidden: torch.Tensor, sizes: torch.Tensor, keep: int, protected: int) -> torch.Tensor:
    """DivPrune: greedy max-min (farthest point) selection of ``keep`` free tokens under the cosine
    distance D = 1 - cos of ``hidden`` [B, T, E]; the first pick is the token whose nearest neighbour is
    farthest, each next one maximises its distance to the chosen set. The loop is unrolled (``keep``
    is a Python int). Returns [B, protected + keep] sorted indices, as `top_k_index`."""
    picks = [pick for _, pick in divprune_steps(hidden[:, protected:].float(), sizes[:, protected:] > 0, keep)]
    return _with_protected(torch.stack(picks, dim=1), protected)


def divprune_steps(free: torch.Tensor, valid: torch.Tensor, keep: int):
    """The greedy steps of `max_min_diverse_index` on the free tokens ``free`` [B, N, E] (in the
    dtype given) with ``valid`` [B, N] (not padding): yields, for each of the ``keep`` picks, the
    priorities it chose among [B, N] and the pick [B]."""
    free = torch.nn.functional.normalize(free, dim=-1)
    count = free.shape[1]
    distance = 1.0 - free @ free.transpose(1, 2)                      # [B, N, N], row i = from token i
    # Exactly symmetric (a + b == b + a): the first pick's candidates include mutual nearest
    # neighbours, whose values then tie exactly and both runtimes take the lower index. A float32
    # MatMul is not symmetric to the last bit, and PyTorch and ONNX Runtime broke that tie apart.
    distance = 0.5 * (distance + distance.transpose(1, 2))
    far = torch.full_like(distance, 4.0)                              # above any cosine distance
    not_neighbour = torch.eye(count, dtype=torch.bool, device=free.device).unsqueeze(0) | ~valid.unsqueeze(-1)
    nearest = torch.where(not_neighbour, far, distance).amin(1)       # [B, N]
    # Priorities: padding -1 and chosen tokens -2, so padding only fills a budget the input cannot,
    # and no token is chosen twice.
    padding, taken_value = torch.full_like(nearest, -1.0), torch.full_like(nearest, -2.0)
    positions = torch.arange(count, device=free.device).unsqueeze(0)
    priority = torch.where(valid, nearest, padding)
    taken = torch.zeros_like(valid)
    running = far[:, 0]
    for step in range(keep):
        pick = priority.argmax(-1)                                    # [B]
        yield priority, pick
        if step == keep - 1:
            return
        taken = taken | (positions == pick.unsqueeze(1))
        row = distance.gather(1, pick[:, None, None].expand(-1, 1, count))[:, 0]    # [B, N]
        running = torch.minimum(running, row)
        priority = torch.where(taken, taken_value, torch.where(valid, running, padding))


def bipartite_merge(hidden: torch.Tensor, sizes: torch.Tensor, positions: torch.Tensor, metric: torch.Tensor,
                    merge: int, protected: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ToMe bipartite soft matching: merge ``merge`` tokens of set A (even positions) into their most
    similar token of set B (odd positions) by size-weighted average; returns (hidden, sizes,
    positions) of T - merge tokens, ordered [unmerged A in order ; B].

    The merge is a one-hot MatMul (no scatter-reduce): M [B, r, T_B] one-hot of the matches,
    x_B' = (x_B·s_B + Mᵀ(x_src·s_src)) / (s_B + Mᵀ s_src). Protected tokens never merge and never
    receive; padding (size 0) merges first, and adds nothing when it does."""
    metric = torch.nn.functional.normalize(metric.float(), dim=-1)
    a_metric, b_metric = metric[:, ::2], metric[:, 1::2]
    scores = a_metric @ b_metric.transpose(1, 2)                       # [B, T_A, T_B]
    a_sizes, b_sizes = sizes[:, ::2], sizes[:, 1::2]
    a_count, b_count = scores.shape[1], scores.shape[2]
    a_index = torch.arange(a_count, device=metric.device) * 2
    b_index = torch.arange(b_count, device=metric.device) * 2 + 1
    # Receivers: no protected token, no padding. Senders: padding first (+2: free to merge, adds
    # nothing), protected tokens never (-4, below any cosine).
    b_blocked = (b_index < protected).unsqueeze(0) | (b_sizes <= 0)
    scores = torch.where(b_blocked.unsqueeze(1), torch.full_like(scores, -3.0), scores)
    best, match = scores.max(-1)                                       # [B, T_A]
    # padding merges first, earlier padding before later (distinct priorities in (2, 3]: PyTorch and
    # ONNX Runtime order ties differently, and which padding stays decides the real tokens' slots,
    # hence their A/B sides, in the next stage)
    padding = 3.0 - a_index.to(best.dtype) / (2 * a_count + 1)
    best = torch.where(a_sizes <= 0, padding.unsqueeze(0).expand_as(best), best)
    best = torch.where((a_index < protected).unsqueeze(0), torch.full_like(best, -4.0), best)
    order = best.topk(a_count, dim=-1).indices                         # descending
    # split, not slices: slicing with a symbolic r clamps (Min/Max) and, over several text stages,
    # torch.export loses track of the token count
    source, unmerged = order.split([merge, a_count - merge], dim=1)    # [B, r], [B, T_A - r]
    unmerged = unmerged.sort(dim=-1).values
    target = match.gather(1, source)                                   # [B, r]

    a_hidden, b_hidden = hidden[:, ::2], hidden[:, 1::2]
    source_sizes = a_sizes.gather(1, source).to(hidden.dtype)          # [B, r]
    source_weighted = _gather_tokens(a_hidden, source) * source_sizes.unsqueeze(-1)
    one_hot = (target.unsqueeze(-1) == torch.arange(b_count, device=hidden.device)).to(hidden.dtype)  # [B, r, T_B]
    merged_sizes = b_sizes.to(hidden.dtype) + (one_hot * source_sizes.unsqueeze(-1)).sum(1)
    numerator = b_hidden * b_sizes.to(hidden.dtype).unsqueeze(-1) + one_hot.transpose(1, 2) @ source_weighted
    b_hidden = torch.where(merged_sizes.unsqueeze(-1) > 0,
                           numerator / merged_sizes.clamp_min(1e-6).unsqueeze(-1), b_hidden)
    hidden = torch.cat([_gather_tokens(a_hidden, unmerged), b_hidden], dim=1)
    sizes = torch.cat([a_sizes.gather(1, unmerged), merged_sizes.to(sizes.dtype)], dim=1)
    positions = torch.cat([positions[:, ::2].gather(1, unmerged), positions[:, 1::2]], dim=1)
    return hidden, sizes, positions


# --------------------------------------------------------------------------------------- forward
@dataclass
class _TokenState:
    hidden: torch.Tensor      # [B, T, E]
    sizes: torch.Tensor       # [B, T]
    positions: torch.Tensor   # [B, T]

    def take(self, index: torch.Tensor) -> "_TokenState":
        return _TokenState(_gather_tokens(self.hidden, index), _gather_tokens(self.sizes, index),
                           _gather_tokens(self.positions, index))


def _head_dim(config) -> int:
    return int(getattr(config, "attention_head_dim", None) or config.hidden_size // config.num_attention_heads)


def _layer_parts(layer: nn.Module, layout, family: str) -> tuple[nn.Module | None, nn.Linear, nn.Linear]:
    norm_path = ATTENTION_NORMS[family]
    norm = layer.get_submodule(norm_path) if norm_path else None
    return norm, layer.get_submodule(layout.q), layer.get_submodule(layout.k)


def run_layers(layers: nn.ModuleList, state: _TokenState, spec: dict, layout, family: str, config) -> _TokenState:
    """Run ``layers`` on ``state`` with the rewrite ``spec`` (the config's ``token_pruning``)."""
    stages = {int(stage["after_layer"]): stage for stage in spec["stages"]}
    scored_by = {int(layer): stage for stage in spec["stages"] if stage["method"] == "cls_topk"
                 for layer in stage.get("score_layers") or [stage["after_layer"]]}
    protected = int(spec.get("protected", 1))
    input_free = state.hidden.shape[1] - protected
    head_dim = _head_dim(config)
    merged = False
    cls_scores = None
    for index, layer in enumerate(layers):
        proportional = merged and bool(spec.get("proportional_attention", True))
        bias = attention_bias(state.sizes, proportional, state.hidden.dtype)
        stage = stages.get(index)
        needs_scores = index in scored_by or (stage is not None and stage["method"] == "tome")
        if needs_scores:
            norm, q, k = _layer_parts(layer, layout, family)
            attention_input = norm(state.hidden) if norm is not None else state.hidden
            if index in scored_by:
                layer_scores = cls_attention(q, k, attention_input, head_dim, bias)
                cls_scores = layer_scores if cls_scores is None else cls_scores + layer_scores
            if stage is not None and stage["method"] == "tome":
                metric = key_metric(k, attention_input, head_dim)
        state.hidden = layer(state.hidden, bias)
        if stage is None:
            continue
        free = state.hidden.shape[1] - protected
        count = stage_count(stage, free, input_free)
        if torch.compiler.is_exporting():
            # Facts torch.export cannot derive from the symbolic text length. A selection keeps at
            # least one token of any text of 8 or more; a merge of a small share may merge none of
            # a short text, and is only bounded above.
            if stage["method"] == "tome":
                torch._check(count <= free // 2)
            else:
                torch._check(count >= 1)
                torch._check(count <= free)
        elif stage["method"] == "tome" and count == 0:
            continue  # nothing to merge (a very short text); the tokens stay as they are
        if stage["method"] == "cls_topk":
            state = state.take(top_k_index(cls_scores, state.sizes, count, protected))
            cls_scores = None
        elif stage["method"] == "divprune":
            state = state.take(max_min_diverse_index(state.hidden, state.sizes, count, protected))
        else:
            hidden, sizes, positions = bipartite_merge(state.hidden, state.sizes, state.positions, metric, count,
                                                       protected)
            state = _TokenState(hidden, sizes, positions)
            merged = True
        if torch.compiler.is_exporting():
            torch._check(state.hidden.shape[1] > 1)
    return state


def _embed(model: nn.Module, family: str, input_ids=None, attention_mask=None, token_type_ids=None,
           pixel_values=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(embedded tokens [B, T, E], sizes [B, T]) for the family's inputs."""
    if family == "bert":
        hidden = model.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], device=hidden.device)
        return hidden, attention_mask.to(hidden.dtype)
    if pixel_values is None:
        raise ValueError(f"{family}: pixel_values are required")
    pixel_values = pixel_values.to(next(model.embeddings.parameters()).dtype)
    hidden = model.embeddings(pixel_values)
    if family == "clip_vision_model":
        hidden = model.pre_layrnorm(hidden)
    return hidden, torch.ones(hidden.shape[:2], dtype=hidden.dtype, device=hidden.device)


def _finish(model: nn.Module, family: str, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(last_hidden_state, pooler_output) as the stock model computes them."""
    if family == "clip_vision_model":
        return hidden, model.post_layernorm(hidden[:, 0])
    if family in ("vit", "deit", "dinov2"):
        hidden = model.layernorm(hidden)
        if family == "dinov2":
            return hidden, hidden[:, 0]
    pooler = getattr(model, "pooler", None)
    return hidden, pooler(hidden) if pooler is not None else None


def token_pruned_forward(model: nn.Module, layout, family: str, *, input_ids=None, attention_mask=None,
                         token_type_ids=None, pixel_values=None, **_ignored) -> TokenPrunedOutput:
    """The base model's forward with the config's ``token_pruning`` rewrite between its layers."""
    spec = model.config.token_pruning
    hidden, sizes = _embed(model, family, input_ids, attention_mask, token_type_ids, pixel_values)
    positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0).expand(hidden.shape[0], -1)
    state = run_layers(model.get_submodule(layout.layers), _TokenState(hidden, sizes, positions), spec, layout,
                       family, model.config)
    last_hidden_state, pooled = _finish(model, family, state.hidden)
    return TokenPrunedOutput(last_hidden_state=last_hidden_state, pooler_output=pooled,
                             token_sizes=state.sizes, kept_positions=state.positions)


def check_token_pruning(spec: dict, num_layers: int) -> None:
    """ValueError naming the problem when ``spec`` is not a valid ``token_pruning`` value."""
    if not isinstance(spec, dict) or not isinstance(spec.get("stages"), list):
        raise ValueError("token_pruning must be {'stages': [...], 'protected': int, 'proportional_attention': bool}")
    seen: list[int] = []
    for number, stage in enumerate(spec["stages"]):
        where = f"token_pruning.stages[{number}]"
        if stage.get("method") not in METHODS:
            raise ValueError(f"{where}.method must be one of {METHODS}, got {stage.get('method')!r}")
        layer = stage.get("after_layer")
        if not isinstance(layer, int) or not 0 <= layer < num_layers:
            raise ValueError(f"{where}.after_layer must be a layer index in [0, {num_layers - 1}], got {layer!r}")
        if seen and layer <= seen[-1]:
            raise ValueError(f"{where}.after_layer must be after the previous stage's layer {seen[-1]}")
        counted = ("merge", "keep_fraction") if stage["method"] == "tome" else ("keep", "keep_fraction")
        if (stage.get(counted[0]) is None) == (stage.get(counted[1]) is None):
            raise ValueError(f"{where} needs exactly one of {counted[0]} or {counted[1]}")
        for layer_scored in stage.get("score_layers") or []:
            if not (seen[-1] if seen else -1) < layer_scored <= layer:
                raise ValueError(f"{where}.score_layers must lie after the previous stage and up to after_layer "
                                 f"{layer}, got {layer_scored}")
        seen.append(layer)
