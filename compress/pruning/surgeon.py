"""The surgeon: slices q/k/v/o and gate/up/down to a layer plan and adds compensation biases.

The model stays its stock HF class; each touched ``nn.Linear`` is replaced by a smaller one and the
module attributes that transformers reads at run time (``num_key_value_groups``,
``intermediate_size``) are updated, so the forward pass and the exporters see consistent widths.
"""

from __future__ import annotations

import torch
from torch import nn

from compress.errors import PlanError
from compress.plan import LayerPlan, PlanStep

# Step artifact holding least-squares refits: "{layer}.o_proj" / "{layer}.down_proj" -> weight [out, kept].
REFIT_ARTIFACT = "refit"


def _sliced_linear(linear: nn.Linear, keep_rows: torch.Tensor | None = None, keep_cols: torch.Tensor | None = None) -> nn.Linear:
    """A new Linear holding ``linear``'s kept output rows / input columns (bias follows the rows)."""
    weight = linear.weight.detach()
    bias = linear.bias.detach() if linear.bias is not None else None
    if keep_rows is not None:
        weight = weight.index_select(0, keep_rows.to(weight.device))
        bias = bias.index_select(0, keep_rows.to(weight.device)) if bias is not None else None
    if keep_cols is not None:
        weight = weight.index_select(1, keep_cols.to(weight.device))
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    new.weight.requires_grad_(linear.weight.requires_grad)
    return new


def summed_bias(base: torch.Tensor | None, delta: list[float], like: torch.Tensor) -> torch.Tensor:
    """The bias [out] that applying a plan gives a linear whose bias was ``base`` [out] (None: it had
    none) and whose plan adds ``delta`` [out]: in ``like``'s dtype and on its device."""
    delta_t = torch.tensor(delta, dtype=torch.float32, device=like.device).to(like.dtype)
    return delta_t if base is None else base.detach().to(like.device, like.dtype) + delta_t


def _with_added_bias(linear: nn.Linear, delta: list[float]) -> nn.Linear:
    """``linear`` with ``delta`` [out] added to its bias (creating the bias if it had none)."""
    if len(delta) != linear.out_features:
        raise PlanError(f"compensation bias has {len(delta)} values, layer has {linear.out_features} outputs")
    bias = summed_bias(linear.bias, delta, linear.weight)
    if linear.bias is None:
        new = nn.Linear(linear.in_features, linear.out_features, bias=True, device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(linear.weight)
            new.bias.copy_(bias)
        return new
    with torch.no_grad():
        linear.bias.copy_(bias)
    return linear


def _slice_norm(norm: nn.Module, keep: torch.Tensor) -> None:
    """Keep ``keep`` entries of a projection-wide norm's weight [width] (OLMo-2's q_norm / k_norm)."""
    with torch.no_grad():
        norm.weight = nn.Parameter(norm.weight.detach().index_select(0, keep.to(norm.weight.device)),
                                   requires_grad=norm.weight.requires_grad)


def _head_rows(heads: list[int], head_dim: int) -> torch.Tensor:
    """[len(heads)·head_dim] row indices of the given heads."""
    idx = torch.tensor(heads, dtype=torch.long)
    return (idx[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


def _check_indices(name: str, indices: list[int], size: int, layer: int) -> None:
    if not indices:
        raise PlanError(f"layer {layer}: {name} keeps nothing; every layer must keep at least one")
    if sorted(set(indices)) != list(indices) or indices[0] < 0 or indices[-1] >= size:
        raise PlanError(f"layer {layer}: {name} must be sorted unique indices in [0, {size}), got {indices[:8]}…")


def _with_weight(linear: nn.Linear, weight: torch.Tensor, layer: int, name: str) -> nn.Linear:
    """``linear`` with its weight replaced by a refit of the same shape."""
    if tuple(weight.shape) != tuple(linear.weight.shape):
        raise PlanError(f"layer {layer}: refit {name} weight is {tuple(weight.shape)}, the sliced layer "
                        f"{tuple(linear.weight.shape)}")
    with torch.no_grad():
        linear.weight.copy_(weight.to(device=linear.weight.device, dtype=linear.weight.dtype))
    return linear


def layer_slices(adapter, plan: LayerPlan) -> dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]:
    """role -> (kept output rows, kept input columns) of each linear that ``plan`` slices, checked
    against the layer's current widths. q/k/v and gate/up lose rows; o_proj and down_proj columns."""
    i = plan.index
    if not 0 <= i < adapter.num_layers:
        raise PlanError(f"plan names layer {i}, the model has {adapter.num_layers}")
    widths = adapter.widths(i)
    slices: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
    if plan.keep_kv_heads is not None and plan.keep_heads is None:
        raise PlanError(f"layer {i}: keep_kv_heads is given without keep_heads; a plan that removes KV heads "
                        "names the query heads it keeps too")
    if plan.keep_heads is not None:
        keep_kv = plan.keep_kv_heads if plan.keep_kv_heads is not None else list(range(widths.kv_heads))
        _check_indices("keep_heads", plan.keep_heads, widths.heads, i)
        _check_indices("keep_kv_heads", keep_kv, widths.kv_heads, i)
        kv_of_head = adapter.kv_head_of_query_heads(i)
        per_kv = [sum(1 for h in plan.keep_heads if int(kv_of_head[h]) == kv) for kv in keep_kv]
        if len(set(per_kv)) != 1 or sum(per_kv) != len(plan.keep_heads):
            raise PlanError(
                f"layer {i}: kept query heads must belong to kept KV heads in equal numbers per KV head "
                f"(got {per_kv} for KV heads {keep_kv})"
            )
        q_rows, kv_rows = _head_rows(plan.keep_heads, adapter.head_dim), _head_rows(keep_kv, adapter.head_dim)
        slices.update(q_proj=(q_rows, None), k_proj=(kv_rows, None), v_proj=(kv_rows, None), o_proj=(None, q_rows))
    if plan.keep_channels is not None:
        _check_indices("keep_channels", plan.keep_channels, widths.intermediate, i)
        rows = torch.tensor(plan.keep_channels, dtype=torch.long)
        slices.update(gate_proj=(rows, None), up_proj=(rows, None), down_proj=(None, rows))
    return slices


def apply_layer_plan(adapter, plan: LayerPlan, refit: dict[str, torch.Tensor] | None = None) -> None:
    """Slice layer ``plan.index`` of the adapter's model in place; ``refit`` (see ``REFIT_ARTIFACT``)
    replaces the sliced consumers' weights by least-squares refits before the biases are added."""
    i = plan.index
    slices = layer_slices(adapter, plan)
    attn, mlp = adapter.attention(i), adapter.mlp(i)
    projection_norms = getattr(adapter, "projection_norms", lambda _: {})  # decoders; MoE attention has none
    for role, norm in projection_norms(i).items():
        if role in slices:
            _slice_norm(norm, slices[role][0])
    for role, (rows, cols) in slices.items():
        parent = attn if role in ("q_proj", "k_proj", "v_proj", "o_proj") else mlp
        setattr(parent, role, _sliced_linear(getattr(parent, role), keep_rows=rows, keep_cols=cols))
    if plan.keep_heads is not None:
        attn.num_key_value_groups = attn.q_proj.out_features // attn.k_proj.out_features
    if plan.keep_channels is not None:
        mlp.intermediate_size = len(plan.keep_channels)
    refit = refit or {}
    if f"{i}.o_proj" in refit:
        attn.o_proj = _with_weight(attn.o_proj, refit[f"{i}.o_proj"], i, "o_proj")
    if plan.o_proj_bias is not None:
        attn.o_proj = _with_added_bias(attn.o_proj, plan.o_proj_bias)
    if f"{i}.down_proj" in refit:
        mlp.down_proj = _with_weight(mlp.down_proj, refit[f"{i}.down_proj"], i, "down_proj")
    if plan.down_proj_bias is not None:
        mlp.down_proj = _with_added_bias(mlp.down_proj, plan.down_proj_bias)


def slice_lora_factors(model, adapter, plans: list[LayerPlan], factors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LoRA factors (see ``compress.training.lora_factors``) cut to the kept units of ``plans``:
    ``lora_B`` rows of the sliced rows, ``lora_A`` columns of the sliced columns, so that adding
    ``scaling · B @ A`` to the sliced weights gives the sliced merge. Call before slicing."""
    from compress.training import module_names

    cut = dict(factors)
    for plan in plans:
        slices = layer_slices(adapter, plan)
        linears = {**adapter.attention_linears(plan.index), **adapter.mlp_linears(plan.index)}
        for role, (rows, cols) in slices.items():
            name = module_names(model, [linears[role]])[0]
            if f"{name}.lora_A" not in cut:
                continue
            if rows is not None:
                cut[f"{name}.lora_B"] = cut[f"{name}.lora_B"].index_select(0, rows).contiguous()
            if cols is not None:
                cut[f"{name}.lora_A"] = cut[f"{name}.lora_A"].index_select(1, cols).contiguous()
    return cut


def apply_step(adapter, step: PlanStep) -> None:
    """Apply every layer plan of one step (with its least-squares refits, if any)."""
    refit = getattr(step, "artifacts", {}).get(REFIT_ARTIFACT)
    for layer_plan in step.layers:
        apply_layer_plan(adapter, layer_plan, refit)
