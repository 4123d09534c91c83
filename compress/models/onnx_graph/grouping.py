"""Coupled-channel groups of an ONNX model, from the atoms of its initializers' axes.

Every leaf atom of size > 1 that sits on some initializer axis is one group; its members are the
slices of those initializers (block / repeat / stride locate the atom inside the axis, see
``compress.pruning.groups.ParamSlice``). A group is prunable when its atom is not frozen and it
owns at least one producer slice (rows that make the channel).
"""

from __future__ import annotations

import math
from pathlib import Path

import onnx

from compress.errors import CompressError
from compress.pruning.groups import ChannelGroup, ParamSlice
from compress.models.onnx_graph.atoms import Atom, find, leaves
from compress.models.onnx_graph.graph import RESIZABLE_IO, GraphAtoms


WEIGHT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}


def load_onnx(path: str | Path, weights: bool = False) -> onnx.ModelProto:
    """The model's graph, without its external weight data (shapes only) unless ``weights``."""
    path = Path(path)
    if not path.is_file():
        raise CompressError(f"{path}: ONNX file not found")
    try:
        return onnx.load(str(path), load_external_data=weights)
    except Exception as exc:  # a damaged or non-ONNX file, or missing external data
        raise CompressError(f"{path}: not a readable ONNX model ({exc})") from None


# ONNX Runtime's fused kernels (compress's fused decoder graph, onnxruntime-genai's model builder): their
# head counts are attributes and their channels are packed, which the op-by-op propagation cannot follow.
FUSED_OPS = ("GroupQueryAttention", "MultiHeadAttention", "SkipSimplifiedLayerNormalization", "SkipLayerNormalization",
             "MatMulNBits")


def fused_ops(model: onnx.ModelProto) -> list[str]:
    """The fused ONNX Runtime ops in ``model``'s graph (sorted, once each)."""
    return sorted({node.op_type for node in model.graph.node if node.op_type in FUSED_OPS})


def find_groups(model: onnx.ModelProto, resizable_io: tuple[str, ...] = RESIZABLE_IO) -> tuple[list[ChannelGroup], GraphAtoms]:
    """Groups in a deterministic order (first initializer, then axis, then factor position)."""
    fused = fused_ops(model)
    if fused:
        raise CompressError(f"the graph uses ONNX Runtime's fused ops ({', '.join(fused)}), whose channels cannot be "
                            "grouped op by op: prune the PyTorch model instead, or prune a graph exported with "
                            "export.onnx.graph: traced")
    graph = GraphAtoms.build(model, resizable_io)
    by_root: dict[int, tuple[Atom, list[ParamSlice]]] = {}
    order: list[int] = []
    for init in model.graph.initializer:
        dims = graph.dims.get(init.name)
        if not dims or init.data_type not in WEIGHT_TYPES:  # shape constants and indices are not weights
            continue
        for axis, dim in enumerate(dims):
            parts = [leaf for atom in dim for leaf in leaves(atom)]
            sizes = [leaf.size or 1 for leaf in parts]
            for k, leaf in enumerate(parts):
                if leaf.size is None or leaf.size <= 1:
                    continue
                root = find(leaf)
                block = math.prod(sizes[k + 1:])
                repeat = math.prod(sizes[:k])
                role = graph.roles.get((init.name, axis), "channel")
                piece = ParamSlice(init.name, axis, block=block, offset=0, role=role, repeat=repeat,
                                   stride=root.size * block if repeat > 1 else 0)
                if id(root) not in by_root:
                    by_root[id(root)] = (root, [])
                    order.append(id(root))
                by_root[id(root)][1].append(piece)
    groups = []
    for index, key in enumerate(order):
        root, slices = by_root[key]
        group = ChannelGroup(id=index, units=root.size, slices=slices, frozen=root.frozen,
                             label=_label(graph, slices))
        graph.group_roots[index] = root
        if group.frozen is None and not any(s.role == "producer" for s in slices):
            group.frozen = "no producer weights (nothing makes these channels)"
        groups.append(group)
    return groups, graph


def _label(graph: GraphAtoms, slices: list[ParamSlice]) -> str:
    """Short description: the producers (by consuming node) → the consumers."""
    def names(role: str) -> list[str]:
        found = []
        for s in slices:
            if s.role == role:
                node = (graph.consumers.get(s.tensor) or [s.tensor])[0]
                found.append(node)
        return found

    producers, consumers = names("producer"), names("consumer")
    text = ", ".join(producers[:3]) + (" …" if len(producers) > 3 else "")
    if consumers:
        text += " → " + ", ".join(consumers[:2]) + (" …" if len(consumers) > 2 else "")
    return text or slices[0].tensor
