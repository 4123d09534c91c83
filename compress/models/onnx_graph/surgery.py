"""Surgery on the ONNX graph: slice initializers to the kept units and patch the shape literals.

``prune_onnx(model, groups, graph, keep)`` returns a new ModelProto in which, for every group
``g`` in ``keep``, only units ``keep[g]`` remain: each member slice of each initializer loses the
indices of the removed units. Literals in Reshape/Expand targets that count the pruned factors
(a head count such as the ``6`` of ``[batch, 6, seq, 64]``) are recomputed; because exporters share
such constants between layers, the Concat that assembles the target is cloned per node before
its literal is replaced. Resizable graph inputs/outputs (the KV cache) get their new static sizes.
"""

from __future__ import annotations

import copy
import fnmatch
import math

import numpy as np
import onnx
from onnx import helper, numpy_helper

from compress.errors import CompressError
from compress.pruning.groups import ChannelGroup
from compress.models.onnx_graph.atoms import find, leaves
from compress.models.onnx_graph.graph import GraphAtoms


def _check_keep(groups: dict[int, ChannelGroup], keep: dict[int, list[int]]) -> None:
    for gid, units in keep.items():
        if gid not in groups:
            raise CompressError(f"group {gid}: no such group")
        group = groups[gid]
        if not group.prunable and sorted(units) != list(range(group.units)):
            raise CompressError(f"group {gid} ({group.label}) is frozen: {group.frozen}")
        if not units:
            raise CompressError(f"group {gid} ({group.label}) would keep no unit")
        if sorted(set(units)) != list(units) or units[0] < 0 or units[-1] >= group.units:
            raise CompressError(f"group {gid}: kept units must be sorted unique indices in [0, {group.units})")


def kept_indices(groups: list[ChannelGroup], keep: dict[int, list[int]], shapes: dict[str, tuple[int, ...]]
                 ) -> dict[tuple[str, int], np.ndarray]:
    """(initializer, axis) -> kept indices along that axis, for every axis some group cuts."""
    removed: dict[tuple[str, int], set[int]] = {}
    for group in groups:
        if group.id not in keep:
            continue
        drop = sorted(set(range(group.units)) - set(keep[group.id]))
        if not drop:
            continue
        for piece in group.slices:
            removed.setdefault((piece.tensor, piece.axis), set()).update(piece.indices(drop).tolist())
    return {key: np.array([i for i in range(shapes[key[0]][key[1]]) if i not in gone], dtype=np.int64)
            for key, gone in removed.items()}


def prune_onnx(model: onnx.ModelProto, groups: list[ChannelGroup], graph: GraphAtoms,
               keep: dict[int, list[int]]) -> onnx.ModelProto:
    """A pruned copy of ``model`` (which must hold its weights: load it with external data)."""
    by_id = {g.id: g for g in groups}
    _check_keep(by_id, keep)
    pruned = copy.deepcopy(model)
    cuts = kept_indices(groups, keep, graph.initializer_shapes)
    for init in pruned.graph.initializer:
        axes = [(axis, index) for (name, axis), index in cuts.items() if name == init.name]
        if not axes:
            continue
        array = numpy_helper.to_array(init)
        for axis, index in axes:
            array = np.take(array, index, axis=axis)
        init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array), init.name))

    new_size = _new_sizes(groups, keep, graph)
    _patch_literals(pruned, graph, new_size)
    _resize_io(pruned, graph, new_size)
    del pruned.graph.value_info[:]
    return pruned


def _new_sizes(groups, keep, graph: GraphAtoms):
    """leaf atom -> its size after pruning."""
    kept = {id(graph.group_roots[g.id]): len(keep[g.id]) for g in groups if g.id in keep}

    def size(leaf) -> int | None:
        root = find(leaf)
        return kept.get(id(root), root.size)

    return size


def _patch_literals(model: onnx.ModelProto, graph: GraphAtoms, new_size) -> None:
    nodes = [_copy(n) for n in model.graph.node]
    producers = {out: n for n in nodes for out in n.output}
    initializers = {i.name: i for i in model.graph.initializer}
    patches: dict[int, dict[int, int]] = {}  # node position -> {target element: new value}
    for use in graph.literal_uses:
        sizes = [new_size(leaf) for atom in use.atoms for leaf in leaves(atom)]
        if any(s is None for s in sizes):
            continue
        old = math.prod(leaf.size or 1 for atom in use.atoms for leaf in leaves(atom))
        new = math.prod(sizes)
        if new != old:
            patches.setdefault(use.node, {})[use.element] = new
    inserted: dict[int, onnx.NodeProto] = {}
    for index, changes in sorted(patches.items()):
        node = nodes[index]
        tag = f"{node.name or node.op_type}_{index}"
        shape_name = node.input[1]
        values = _constant_values(shape_name, producers, initializers)
        if values is not None:  # the target is one constant: replace it for this node only
            for k, v in changes.items():
                values[k] = v
            node.input[1] = _add_constant(model, f"{shape_name}__{tag}", values)
            continue
        concat = producers.get(shape_name)
        if concat is None or concat.op_type != "Concat":
            raise CompressError(f"cannot patch the shape of {node.op_type} {node.name!r}: its target is not a "
                                "constant or a Concat of constants and shape pieces")
        clone = helper.make_node("Concat", [], [f"{shape_name}__{tag}"], name=f"{concat.name}__{tag}", axis=0)
        offset = 0
        for piece in concat.input:
            length = len(graph.values.get(piece) or [])
            local = {k - offset: v for k, v in changes.items() if offset <= k < offset + length}
            if local:
                piece_values = _constant_values(piece, producers, initializers)
                if piece_values is None:
                    raise CompressError(f"cannot patch the shape of {node.name!r}: piece {piece!r} is computed")
                for k, v in local.items():
                    piece_values[k] = v
                piece = _add_constant(model, f"{piece}__{tag}", piece_values)
            clone.input.append(piece)
            offset += length
        inserted[index] = clone
        node.input[1] = clone.output[0]
    ordered = []
    for index, node in enumerate(nodes):
        if index in inserted:
            ordered.append(inserted[index])
        ordered.append(node)
    del model.graph.node[:]
    model.graph.node.extend(ordered)


def _copy(node: onnx.NodeProto) -> onnx.NodeProto:
    clone = onnx.NodeProto()
    clone.CopyFrom(node)
    return clone


def _constant_values(name, producers, initializers) -> list[int] | None:
    if name in initializers:
        return numpy_helper.to_array(initializers[name]).reshape(-1).tolist()
    node = producers.get(name)
    if node is not None and node.op_type == "Constant":
        return numpy_helper.to_array(node.attribute[0].t).reshape(-1).tolist()
    return None


def _add_constant(model: onnx.ModelProto, name: str, values: list[int]) -> str:
    model.graph.initializer.append(numpy_helper.from_array(np.array(values, dtype=np.int64), name))
    return name


def _resize_io(model: onnx.ModelProto, graph: GraphAtoms, new_size) -> None:
    for value in list(model.graph.input) + list(model.graph.output):
        if not any(fnmatch.fnmatch(value.name, p) for p in graph.resizable_io):
            continue
        dims = graph.dims.get(value.name)
        if dims is None:
            continue
        for proto_dim, dim in zip(value.type.tensor_type.shape.dim, dims):
            if proto_dim.HasField("dim_value"):
                sizes = [new_size(leaf) for atom in dim for leaf in leaves(atom)]
                if all(s is not None for s in sizes):
                    proto_dim.dim_value = math.prod(sizes)
