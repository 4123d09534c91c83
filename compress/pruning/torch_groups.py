"""Coupled-channel groups of any ``nn.Module`` from torch-pruning's DependencyGraph (SPA's torch twin).

For a model without a compress adapter (a custom module, a CNN), torch-pruning traces the autograd
graph of one forward pass and links the layers whose channels must be removed together. Each of its
groups becomes a :class:`~compress.pruning.groups.ChannelGroup`, so the scorers, allocators and plan
format that serve the ONNX grouping serve any module too.

Every group is rooted at the output channels of its first producer (Conv, Linear, Embedding) in
``model.named_modules()`` order; its ``units`` are that producer's output channels. A member's
torch-pruning indices become ``(offset, block, repeat, stride)`` on the parameter axis: a Flatten after
a [C, H, W] map gives ``block = H·W``, a Concat gives an ``offset``, a tensor concatenated with itself
a ``repeat``. Anything else is frozen with a reason, never
guessed: a Split/Slice/Expand that reaches only part of the units, grouped convolutions, norms that
mix channels (LayerNorm, GroupNorm), per-channel state that is not a parameter, bare parameters,
MultiheadAttention/LSTM, the model input or output. A group that survives those rules is then
checked by a NaN probe: NaN is written into the probe units of its producers and every member must
see NaN exactly on the indices its slices name, and nowhere else (this catches ops torch-pruning
silently treats as element-wise, such as a mean over channels).

``prune_torch_model`` slices the parameters named by the groups in place and updates the module
attributes (``out_channels``, ``in_features``, ``num_features``, BatchNorm running statistics, ...),
so it needs only the groups and the kept units: a saved plan replays without example inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral
from typing import Any, Iterable

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning import ops

from compress.errors import PlanError
from compress.pruning.groups import ChannelGroup, ParamSlice

OUTPUT_REASON = "reaches the model output"
INPUT_REASON = "reaches the model input (or a tensor outside the autograd graph)"

PRODUCER_TYPES = (nn.modules.conv._ConvNd, nn.Linear, nn.Embedding)
OTHER_ROOT_TYPES = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm,
                    nn.modules.instancenorm._InstanceNorm, nn.PReLU, nn.MultiheadAttention, nn.LSTM)
PER_CHANNEL_TYPES = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.PReLU)
DUMMY_OPTYPES = (ops.OPTYPE.ELEMENTWISE, ops.OPTYPE.CONCAT, ops.OPTYPE.SPLIT, ops.OPTYPE.RESHAPE,
                 ops.OPTYPE.UNBIND, ops.OPTYPE.EXPAND, ops.OPTYPE.SLICE)
# autograd ops that combine several tensors channel by channel: a missing operand is a graph input or buffer
COMBINING_OPS = ("Add", "Sub", "Rsub", "Mul", "Div", "Cat", "Stack", "Where", "Maximum", "Minimum")


@dataclass
class _Member:
    """One torch-pruning dependency target of a group, resolved to a module and a direction.

    kind: "out" (output channels of a Conv/Linear/Embedding), "in" (input channels of a Conv/Linear),
    "through" (a per-channel module: norms, PReLU, depthwise conv), "dummy" (an autograd op with no
    parameters), "output" (the model output), or "unsupported".
    idxs / root_idxs: the member's indices and the root unit each one belongs to.
    """

    node: Any
    module: Any
    name: str
    kind: str
    idxs: list[int]
    root_idxs: list[int | None]


@dataclass
class _Context:
    """What converting a torch-pruning group needs besides the group itself."""

    dg: tp.DependencyGraph
    module_names: dict[int, str]
    module_order: dict[int, int]
    param_names: dict[int, str]
    param_order: dict[str, int]
    param_shapes: dict[str, tuple[int, ...]]
    output_grad_fns: set[int]
    ignored: set[int]
    freeze_outputs: bool


def tensor_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """{parameter name in ``model.named_parameters()``: shape} for ``ChannelGroup.unit_cost`` / ``describe``."""
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def torch_groups(model: nn.Module, example_inputs: Any, *, ignored_layers: Iterable[nn.Module | str] = (),
                 freeze_outputs: bool = True) -> list[ChannelGroup]:
    """Coupled-channel groups of ``model`` traced on ``example_inputs``.

    example_inputs: a tensor (``model(x)``), a tuple/list (``model(*x)``) or a dict (``model(**x)``).
    ignored_layers: modules (or their names) whose output channels must stay; their groups are frozen.
    freeze_outputs: freeze the groups whose channels reach the model output (the classifier rows).
    Returns groups with ids 0..n-1, ordered by their root module in ``model.named_modules()``;
    slices ordered by parameter (``model.named_parameters()`` order), axis and offset.
    The model's train/eval mode is restored; its weights are not changed.
    """
    args = _as_call(example_inputs)
    was_training = model.training
    try:
        dg, outputs = _build_graph(model, args)
        ctx = _context(model, dg, outputs, ignored_layers, freeze_outputs)
        converted = sorted((_convert(ctx, tp_group) for tp_group in _walk_groups(ctx)), key=lambda item: item[0])
        groups = [group for _, group in converted]
        for new_id, group in enumerate(groups):
            group.id = new_id
        _probe_all(model, args, groups, freeze_outputs)
        return groups
    finally:
        model.train(was_training)


def prune_torch_model(model: nn.Module, groups: list[ChannelGroup], keep: dict[int, list[int]]) -> nn.Module:
    """Slice ``model`` in place so that group ``g`` keeps only the units ``keep[g]``; returns ``model``.

    keep: {group id: unit indices to keep}, each in [0, units), at least one, no repeats; groups
    not in ``keep`` are untouched. Refuses (PlanError, a CompressError) an unknown or frozen group,
    an empty, repeated or out-of-range keep list, and groups that do not fit the model's parameters.
    Indices of every group refer to the model as it was before this call, so a Concat's consumer
    sliced by two groups is cut once, in its original coordinates.
    """
    by_id = {g.id: g for g in groups}
    params = dict(model.named_parameters())
    keep = {gid: units.tolist() if isinstance(units, torch.Tensor) else list(units) for gid, units in keep.items()}
    for gid in sorted(keep, key=str):
        _check_keep(by_id, gid, keep[gid], params)
    keep = {gid: [int(u) for u in units] for gid, units in keep.items()}
    removed = _removed_indices(by_id, keep)
    per_module = _kept_indices_by_module(removed, params)
    modules = dict(model.named_modules())
    for owner in sorted(per_module):
        _slice_module(modules[owner], per_module[owner])
    return model


# ---------------------------------------------------------------- tracing


def _as_call(example_inputs: Any) -> tuple[tuple, dict]:
    """(positional, keyword) arguments of one forward call."""
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def _call(model: nn.Module, args: tuple[tuple, dict]) -> Any:
    return model(*args[0], **args[1])


def _build_graph(model: nn.Module, args: tuple[tuple, dict]) -> tuple[tp.DependencyGraph, list[torch.Tensor]]:
    """torch-pruning's DependencyGraph of one traced forward, and the output tensors of that forward.

    Tracing follows autograd, so parameters frozen with ``requires_grad=False`` are unfrozen for it.
    """
    outputs: list[torch.Tensor] = []

    def keep_outputs(out):
        outputs.extend(t for t in tp.utils.flatten_as_list(out) if isinstance(t, torch.Tensor))
        return out

    frozen = [p for p in model.parameters() if not p.requires_grad]
    try:
        for p in frozen:
            p.requires_grad_(True)
        with torch.enable_grad():
            dg = tp.DependencyGraph().build_dependency(
                model, example_inputs=args, forward_fn=lambda m, a: _call(m, a),
                output_transform=keep_outputs, verbose=False)
    finally:
        for p in frozen:
            p.requires_grad_(False)
    return dg, outputs


def _context(model: nn.Module, dg: tp.DependencyGraph, outputs: list[torch.Tensor],
             ignored_layers: Iterable[nn.Module | str], freeze_outputs: bool) -> _Context:
    named = list(model.named_modules())
    by_name = dict(named)
    ignored = set()
    for layer in ignored_layers:
        module = by_name.get(layer) if isinstance(layer, str) else layer
        if module is None:
            raise PlanError(f"ignored layer {layer!r} is not a module of the model")
        ignored.add(id(module))
    param_names: dict[int, str] = {}
    for name, p in model.named_parameters():
        param_names.setdefault(id(p), name)
    return _Context(
        dg=dg,
        module_names={id(m): name for name, m in named},
        module_order={id(m): i for i, (_, m) in enumerate(named)},
        param_names=param_names,
        param_order={name: i for i, (name, _) in enumerate(model.named_parameters())},
        param_shapes=tensor_shapes(model),
        output_grad_fns={id(t.grad_fn) for t in outputs if t.grad_fn is not None},
        ignored=ignored,
        freeze_outputs=freeze_outputs,
    )


def _walk_groups(ctx: _Context) -> list:
    """torch-pruning groups rooted at producers first, then at norms/PReLU/MHA/LSTM nobody produced."""
    dg = ctx.dg
    found = []
    visited: list[nn.Module] = []
    for root_types in (PRODUCER_TYPES, OTHER_ROOT_TYPES):
        for group in dg.get_all_groups(ignored_layers=list(visited), root_module_types=root_types):
            group = _canonical_root(ctx, group)
            found.append(group)
            visited.extend(dep.target.module for dep, _ in group
                           if isinstance(dep.target.module, nn.Module) and dg.is_out_channel_pruning_fn(dep.handler))
    return found


def _canonical_root(ctx: _Context, group):
    """The same group rooted at its first full-width producer in module order (deterministic labels)."""
    units = len(group[0].idxs)
    best, best_order = group[0].dep.target.module, ctx.module_order.get(id(group[0].dep.target.module), 1 << 30)
    for item in group:
        module = item.dep.target.module
        if (isinstance(module, PRODUCER_TYPES) and _direction(ctx.dg, item.dep.target, item.dep.handler) == "out"
                and list(item.idxs) == list(range(units)) and list(item.root_idxs) == list(range(units))
                and ctx.module_order.get(id(module), 1 << 30) < best_order):
            best, best_order = module, ctx.module_order[id(module)]
    if best is group[0].dep.target.module:
        return group
    pruner = ctx.dg.get_pruner_of_module(best)
    return ctx.dg.get_pruning_group(best, pruner.prune_out_channels, list(range(units)))


# ---------------------------------------------------------------- members


def _direction(dg: tp.DependencyGraph, node, handler) -> str:
    """How a dependency touches its target: "out", "in", "through", "dummy", "output" or "unsupported"."""
    module = node.module
    if node.type == ops.OPTYPE.OUTPUT:
        return "output"
    if node.type in DUMMY_OPTYPES:
        return "dummy"
    if node.type == ops.OPTYPE.DEPTHWISE_CONV or isinstance(module, PER_CHANNEL_TYPES + (nn.LayerNorm, nn.GroupNorm)):
        return "through"
    if isinstance(module, PRODUCER_TYPES):
        if isinstance(module, nn.Embedding):
            return "out"
        pruner = dg.get_pruner_of_module(module)
        return "out" if handler == pruner.prune_out_channels else "in"
    return "unsupported"


def _members(ctx: _Context, group) -> list[_Member]:
    members = []
    for item in group:
        node = item.dep.target
        name = ctx.module_names.get(id(node.module)) or ctx.param_names.get(id(node.module)) or str(node.module)
        members.append(_Member(node=node, module=node.module, name=name,
                               kind=_direction(ctx.dg, node, item.dep.handler),
                               idxs=list(item.idxs), root_idxs=list(item.root_idxs)))
    return members


def _slice_pattern(member: _Member, units: int) -> dict[str, int] | None:
    """ParamSlice layout (offset, block, repeat, stride) of the member's indices, or None if they have none.

    Unit u must own exactly ``offset + r·stride + u·block + j`` (r < repeat, j < block): one block per
    unit (block > 1 after a Flatten, offset > 0 after a Concat), repeated when a tensor is concatenated
    with itself.
    """
    if not member.idxs or len(member.idxs) % units or any(r is None for r in member.root_idxs):
        return None
    per_unit: dict[int, list[int]] = {}
    for root, idx in zip(member.root_idxs, member.idxs):
        per_unit.setdefault(root, []).append(idx)
    if sorted(per_unit) != list(range(units)):
        return None
    first = sorted(per_unit[0])
    block = sorted(per_unit[1])[0] - first[0] if units > 1 else _first_run(first)
    if block <= 0 or len(first) % block:
        return None
    repeat = len(first) // block
    layout = {"offset": first[0], "block": block, "repeat": repeat,
              "stride": first[block] - first[0] if repeat > 1 else 0}
    probe = ParamSlice(tensor="", axis=0, **layout)
    for u in range(units):
        if sorted(per_unit[u]) != probe.indices([u]).tolist():
            return None
    return layout


def _first_run(indices: list[int]) -> int:
    """Length of the leading run of consecutive indices."""
    run = 1
    while run < len(indices) and indices[run] == indices[run - 1] + 1:
        run += 1
    return run


def _param(ctx: _Context, module: nn.Module, attr: str) -> str | None:
    p = getattr(module, attr, None)
    return ctx.param_names.get(id(p)) if isinstance(p, nn.Parameter) else None


def _member_slices(ctx: _Context, member: _Member, layout: dict[str, int]) -> list[ParamSlice]:
    """ParamSlices of one member's parameters (conv weight [out, in/groups, *k]; transposed [in, out/groups, *k])."""
    module, kind = member.module, member.kind
    spec: list[tuple[str, int, str]] = []
    if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) and kind in ("out", "in"):
        out_axis, in_axis = (1, 0) if getattr(module, "transposed", False) else (0, 1)
        if kind == "out":
            spec = [("weight", out_axis, "producer"), ("bias", 0, "channel")]
        else:
            spec = [("weight", in_axis, "consumer")]
    elif isinstance(module, nn.modules.conv._ConvNd):
        spec = [("weight", 0, "producer"), ("bias", 0, "channel")]
    elif isinstance(module, nn.Embedding):
        spec = [("weight", 1, "producer")]
    elif isinstance(module, nn.PReLU):
        spec = [("weight", 0, "channel")] if module.num_parameters > 1 else []
    elif kind == "through":
        spec = [("weight", 0, "channel"), ("bias", 0, "channel")]
    slices = []
    for attr, axis, role in spec:
        name = _param(ctx, module, attr)
        if name is not None:
            slices.append(ParamSlice(tensor=name, axis=axis, role=role, **layout))
    return slices


def _member_reason(ctx: _Context, member: _Member) -> str | None:
    """Why this member forbids pruning the group, or None."""
    module, kind = member.module, member.kind
    if kind == "output" or (kind != "in" and id(member.node.grad_fn) in ctx.output_grad_fns):
        return OUTPUT_REASON if ctx.freeze_outputs else None
    if kind == "unsupported":
        if isinstance(module, nn.Parameter):
            return f"bare parameter '{member.name}' is in the group (torch-pruning guesses its axis)"
        return f"'{member.name}' ({type(module).__name__}) is not a layer torch_groups can slice"
    if kind in ("out", "through") and id(module) in ctx.ignored:
        return f"ignored layer '{member.name}'"
    if kind == "through" and not member.node.inputs:
        return INPUT_REASON
    if kind == "dummy" and _combines_untracked(member.node.grad_fn):
        return (f"{member.node.grad_fn.name()} combines these channels with a tensor outside the autograd "
                f"graph (model input or buffer)")
    return _layer_reason(member)


def _combines_untracked(grad_fn) -> bool:
    """An Add/Mul/Cat/... one of whose operands has no autograd history and is not a scalar."""
    if grad_fn is None or not grad_fn.name().startswith(COMBINING_OPS):
        return False
    for position, (fn, _) in enumerate(grad_fn.next_functions):
        if fn is None and not _saved_scalar(grad_fn, position):
            return True
    return False


def _saved_scalar(grad_fn, position: int) -> bool:
    """Whether the operand at ``position`` (0: self, 1: other) was saved by autograd and has one element."""
    saved = getattr(grad_fn, ("_saved_self", "_saved_other")[position], None) if position < 2 else None
    return isinstance(saved, torch.Tensor) and saved.numel() == 1


def _layer_reason(member: _Member) -> str | None:
    """Layers whose channels the plan format cannot cut exactly."""
    module, name = member.module, member.name
    if isinstance(module, nn.modules.conv._ConvNd) and member.kind != "through" and module.groups > 1:
        return f"grouped convolution '{name}' (groups={module.groups}) couples channels in blocks"
    if isinstance(module, nn.LayerNorm):
        if len(module.normalized_shape) != 1:
            return f"LayerNorm '{name}' normalises over {len(module.normalized_shape)} axes"
        return f"LayerNorm '{name}' normalises over these channels (removing them changes its statistics)"
    if isinstance(module, nn.GroupNorm):
        return f"GroupNorm '{name}' normalises over groups of these channels"
    if isinstance(module, PER_CHANNEL_TYPES) and getattr(module, "running_mean", None) is not None \
            and getattr(module, "weight", None) is None:
        return f"'{name}' keeps per-channel running statistics but has no affine parameters to name"
    return None


# ---------------------------------------------------------------- conversion


def _convert(ctx: _Context, tp_group) -> tuple[tuple[int, str], ChannelGroup]:
    """(sort key, ChannelGroup) of one torch-pruning group; id is assigned after sorting."""
    members = _members(ctx, tp_group)
    root = members[0]
    units = len(root.idxs)
    slices: list[ParamSlice] = []
    reasons: list[str] = []
    for member in members:
        reason = _member_reason(ctx, member)
        if reason:
            reasons.append(reason)
        if member.kind in ("dummy", "output", "unsupported"):
            continue
        layout = _slice_pattern(member, units)
        if layout is None:
            reasons.append(f"torch-pruning maps the units to '{member.name}' as no (offset, block) pattern "
                           f"(a Split, Slice or Expand reaches part of them)")
            continue
        slices.extend(_member_slices(ctx, member, layout))
    slices = _ordered_slices(ctx, slices)
    reasons.extend(_range_reasons(slices, units, ctx.param_shapes))
    frozen = OUTPUT_REASON if OUTPUT_REASON in reasons else (reasons[0] if reasons else None)
    group = ChannelGroup(id=-1, units=units, slices=slices, frozen=frozen, label=_label(ctx, members))
    return (ctx.module_order.get(id(root.module), 1 << 30), group.label), group


def _ordered_slices(ctx: _Context, slices: list[ParamSlice]) -> list[ParamSlice]:
    unique = list(dict.fromkeys(slices))
    return sorted(unique, key=lambda s: (ctx.param_order.get(s.tensor, 1 << 30), s.axis, s.offset))


def _range_reasons(slices: list[ParamSlice], units: int, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """A slice that runs past its tensor's axis means torch-pruning's mapping does not fit the layer."""
    reasons = []
    for s in slices:
        size = shapes[s.tensor][s.axis]
        if _span(s, units) > size:
            reasons.append(f"'{s.tensor}' axis {s.axis} has {size} indices, the group reaches index {_span(s, units) - 1}")
    return reasons


def _span(s: ParamSlice, units: int) -> int:
    """One past the largest index the slice names for ``units`` units."""
    return s.offset + (s.repeat - 1) * s.stride + units * s.block


def _label(ctx: _Context, members: list[_Member]) -> str:
    """``conv1.out (+bn1, conv2.in)``: root producer, then the other layers in module order."""
    root = members[0]
    parts = {}
    for member in members[1:]:
        if member.kind not in ("out", "in", "through", "unsupported") or member.module is root.module and member.kind == "out":
            continue
        text = f"{member.name}.{member.kind}" if member.kind in ("out", "in") else member.name
        parts.setdefault(text, ctx.module_order.get(id(member.module), 1 << 30))
    head = f"{root.name}.out" if root.kind == "out" else root.name
    if not parts:
        return head
    return f"{head} (+{', '.join(sorted(parts, key=lambda t: (parts[t], t)))})"


# ---------------------------------------------------------------- NaN probe


def _probe_all(model: nn.Module, args: tuple[tuple, dict], groups: list[ChannelGroup], freeze_outputs: bool) -> None:
    """Freeze each unfrozen group whose NaN probe disagrees with its slices."""
    modules = dict(model.named_modules())
    for group in groups:
        if group.frozen is None and group.prunable:
            group.frozen = _probe(model, args, group, modules, freeze_outputs)


def _probe_units(units: int) -> list[int]:
    return sorted({0, units - 1})


def _output_axis(module: nn.Module) -> int:
    return -1 if isinstance(module, (nn.Linear, nn.Embedding)) else 1


def _input_axis(module: nn.Module) -> int:
    return -1 if isinstance(module, (nn.Linear, nn.LayerNorm)) else 1


def _probe_plan(group: ChannelGroup, modules: dict[str, nn.Module]) -> tuple[dict, dict]:
    """({module name: output indices to fill with NaN}, {module name: input indices expected to be NaN})."""
    units = _probe_units(group.units)
    inject: dict[str, set[int]] = {}
    expect: dict[str, set[int]] = {}
    for s in group.slices:
        owner = s.tensor.rpartition(".")[0]
        target = inject if s.role != "consumer" and _mixes_channels(modules[owner]) else expect
        target.setdefault(owner, set()).update(s.indices(units).tolist())
    return inject, expect


def _mixes_channels(module: nn.Module) -> bool:
    """Conv/Linear/Embedding whose every output channel reads every input channel (not depthwise)."""
    return isinstance(module, PRODUCER_TYPES) and not _is_depthwise(module)


def _is_depthwise(module: nn.Module) -> bool:
    return (isinstance(module, nn.modules.conv._ConvNd) and not module.transposed and module.groups > 1
            and module.groups == module.in_channels == module.out_channels)


def _nan_channels(x: torch.Tensor, axis: int) -> set[int]:
    """Indices along ``axis`` where ``x`` holds a NaN anywhere."""
    moved = torch.isnan(x).movedim(axis, 0).reshape(x.shape[axis], -1)
    return set(moved.any(dim=1).nonzero().flatten().tolist())


def _probe(model: nn.Module, args: tuple[tuple, dict], group: ChannelGroup, modules: dict[str, nn.Module],
           freeze_outputs: bool) -> str | None:
    """Write NaN into the probe units of the group's producers, then check where the members see NaN.

    Consumers (Conv/Linear reading the group) turn NaN in their outputs back to 0, so NaN reaches only
    the layers that read the group's channels. One forward pass of the example inputs per group.
    Returns a freeze reason, or None if everything matches.
    """
    inject, expect = _probe_plan(group, modules)
    seen: dict[str, set[int]] = {name: set() for name in expect}
    hooks = []

    def record(name):
        def hook(module, inputs):
            if inputs and isinstance(inputs[0], torch.Tensor):
                seen[name] |= _nan_channels(inputs[0], _input_axis(module))
        return hook

    def rewrite(name):
        def hook(module, inputs, output):
            if not isinstance(output, torch.Tensor):
                return output
            output = torch.where(torch.isnan(output), torch.zeros_like(output), output)
            if name in inject:
                axis = _output_axis(module)
                index = torch.tensor(sorted(inject[name]), dtype=torch.long, device=output.device)
                output = output.index_fill(axis, index, float("nan"))
            return output
        return hook

    for name in expect:
        hooks.append(modules[name].register_forward_pre_hook(record(name)))
    for name in sorted(set(inject) | {n for n in expect if _mixes_channels(modules[n])}):
        hooks.append(modules[name].register_forward_hook(rewrite(name)))
    try:
        with torch.no_grad():
            out = _call(model, args)
    except Exception as exc:  # the probe must never break grouping: a failing model just freezes the group
        return f"NaN probe forward failed ({type(exc).__name__}: {exc})"
    finally:
        for h in hooks:
            h.remove()
    for name in sorted(expect):
        if seen[name] != expect[name]:
            return (f"NaN probe: '{name}' reads channels {_short(seen[name])} of probe units "
                    f"{_probe_units(group.units)}, the group names {_short(expect[name])}")
    if freeze_outputs and any(torch.isnan(t).any() for t in tp.utils.flatten_as_list(out) if isinstance(t, torch.Tensor)):
        return "NaN probe: the channels reach the model output through a path torch-pruning did not trace"
    return None


def _short(indices: set[int]) -> str:
    items = sorted(indices)
    return str(items) if len(items) <= 8 else f"[{items[0]}..{items[-1]}] ({len(items)} indices)"


# ---------------------------------------------------------------- slicing


def _check_keep(by_id: dict[int, ChannelGroup], gid: int, units: list[int], params: dict[str, torch.Tensor]) -> None:
    group = by_id.get(gid)
    if group is None:
        raise PlanError(f"keep names group {gid}, which does not exist ({len(by_id)} groups)")
    where = f"group {gid} ({group.label or 'no label'})"
    if group.frozen is not None:
        raise PlanError(f"{where} is frozen and cannot be pruned: {group.frozen}")
    if not group.prunable:
        raise PlanError(f"{where} has no weights to remove")
    if not units:
        raise PlanError(f"{where}: the keep list is empty; keep at least one of its {group.units} units")
    bad = [u for u in units if not isinstance(u, Integral) or isinstance(u, bool) or not 0 <= u < group.units]
    if bad:
        raise PlanError(f"{where}: unit indices {bad[:8]} are out of range [0, {group.units})")
    if len(set(units)) != len(units):
        raise PlanError(f"{where}: the keep list repeats units")
    for s in group.slices:
        tensor = params.get(s.tensor)
        if tensor is None:
            raise PlanError(f"{where}: parameter '{s.tensor}' is not in the model")
        if s.axis >= tensor.dim() or _span(s, group.units) > tensor.shape[s.axis]:
            raise PlanError(f"{where}: '{s.tensor}' {tuple(tensor.shape)} is too small on axis {s.axis} "
                            f"for {group.units} units of {s.block} from offset {s.offset}")


def _removed_indices(by_id: dict[int, ChannelGroup], keep: dict[int, list[int]]) -> dict[tuple[str, int], set[int]]:
    """{(parameter, axis): indices to remove}, in the model's current coordinates."""
    removed: dict[tuple[str, int], set[int]] = {}
    for gid, kept in keep.items():
        group = by_id[gid]
        dropped = sorted(set(range(group.units)) - set(kept))
        if not dropped:
            continue
        for s in group.slices:
            removed.setdefault((s.tensor, s.axis), set()).update(s.indices(dropped).tolist())
    return removed


def _kept_indices_by_module(removed: dict[tuple[str, int], set[int]],
                            params: dict[str, torch.Tensor]) -> dict[str, dict[str, dict[int, torch.Tensor]]]:
    """{module name: {parameter attribute: {axis: kept indices [k]}}}."""
    per_module: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    for (tensor, axis), gone in sorted(removed.items()):
        size = params[tensor].shape[axis]
        kept = torch.tensor([i for i in range(size) if i not in gone], dtype=torch.long)
        owner, _, attr = tensor.rpartition(".")
        per_module.setdefault(owner, {}).setdefault(attr, {})[axis] = kept
    return per_module


def _slice_module(module: nn.Module, cuts: dict[str, dict[int, torch.Tensor]]) -> None:
    """Replace the module's parameters by their kept slices, then its width attributes and buffers."""
    depthwise = _is_depthwise(module)
    for attr, axes in cuts.items():
        old = getattr(module, attr)
        new = old.detach()
        for axis, kept in sorted(axes.items()):
            new = new.index_select(axis, kept.to(new.device))
        setattr(module, attr, nn.Parameter(new.contiguous(), requires_grad=old.requires_grad))
    if "weight" in cuts and 0 in cuts["weight"]:
        _slice_running_stats(module, cuts["weight"][0])
    _refresh_widths(module, depthwise)


def _slice_running_stats(module: nn.Module, kept: torch.Tensor) -> None:
    """BatchNorm / InstanceNorm running mean and variance [C] follow the weight's kept channels."""
    if not isinstance(module, PER_CHANNEL_TYPES):
        return
    for name in ("running_mean", "running_var"):
        buf = getattr(module, name, None)
        if isinstance(buf, torch.Tensor) and buf.dim() == 1:
            setattr(module, name, buf.index_select(0, kept.to(buf.device)))


def _refresh_widths(module: nn.Module, was_depthwise: bool) -> None:
    """Width attributes read back from the sliced weight (Conv weight [out, in/groups, *k])."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return
    if isinstance(module, nn.modules.conv._ConvNd):
        if was_depthwise:
            module.in_channels = module.out_channels = module.groups = weight.shape[0]
        elif module.transposed:
            module.in_channels, module.out_channels = weight.shape[0], weight.shape[1] * module.groups
        else:
            module.out_channels, module.in_channels = weight.shape[0], weight.shape[1] * module.groups
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = weight.shape
    elif isinstance(module, nn.Embedding):
        module.embedding_dim = weight.shape[1]
    elif isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
        module.num_features = weight.shape[0]
    elif isinstance(module, nn.PReLU):
        module.num_parameters = weight.shape[0]
    elif isinstance(module, nn.LayerNorm):
        module.normalized_shape = tuple(weight.shape)
    elif isinstance(module, nn.GroupNorm):
        module.num_channels = weight.shape[0]
