"""Walk an ONNX graph once and give every axis of every tensor its atoms (see ``atoms.py``).

``GraphAtoms.build(model)`` applies one rule per op type, in graph order. A rule reads its inputs'
axes, unifies or freezes atoms, and sets its outputs' axes. An op without a rule freezes every
atom it touches (fail closed). At the end, graph inputs and outputs freeze their atoms unless their
name matches ``resizable_io`` (the KV-cache tensors, whose head axis follows the model).
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from compress.models.onnx_graph.atoms import (
    Atom,
    AtomConflict,
    dim_leaves,
    freeze_dim,
    size_of,
    take_leaves,
    unify_dims,
)
from compress.models.onnx_graph.values import DimRef, Element, Lit, evaluate, literal_values

Dims = list[list[Atom]]  # per axis, its atoms (outermost first)

RESIZABLE_IO = ("past_key_values.*", "present.*")

UNARY = {
    "Identity", "Cast", "CastLike", "Relu", "Sigmoid", "Tanh", "Erf", "Gelu", "FastGelu", "Neg", "Sqrt", "Reciprocal",
    "Exp", "Log", "Abs", "Sin", "Cos", "IsNaN", "IsInf", "Not", "Softplus", "Softsign", "Elu", "LeakyRelu",
    "HardSigmoid", "HardSwish", "Selu", "Celu", "Floor", "Ceil", "Round", "Sign", "Mish", "Swish", "QuickGelu",
    "Dropout", "Clip",
}
BROADCAST = {
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where", "Equal", "Less", "Greater", "And", "Or",
    "Xor", "LessOrEqual", "GreaterOrEqual", "Mod", "PRelu", "BitShift",
}
REDUCE = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
          "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"}
NORMS = {"LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization", "SkipLayerNormalization"}
POOLS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool"}
SOURCES = {"Constant", "ConstantOfShape", "Range", "EyeLike", "RandomNormal", "RandomUniform", "RandomNormalLike",
           "RandomUniformLike"}


@dataclass
class LiteralUse:
    """A literal in a Reshape/Expand target that counts the units of some atoms: patch it when they shrink."""

    node: int  # position in graph.node
    element: int
    source: tuple[str, int] | None
    atoms: list[Atom]


@dataclass
class GraphAtoms:
    model: onnx.ModelProto
    dims: dict[str, Dims] = field(default_factory=dict)
    values: dict[str, list[Element]] = field(default_factory=dict)
    roles: dict[tuple[str, int], str] = field(default_factory=dict)  # (initializer, axis) -> role
    literal_uses: list[LiteralUse] = field(default_factory=list)
    unknown_ops: dict[str, int] = field(default_factory=dict)
    initializer_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    consumers: dict[str, list[str]] = field(default_factory=dict)  # initializer -> node names
    group_roots: dict[int, Atom] = field(default_factory=dict)  # group id -> its atom (set by find_groups)
    resizable_io: tuple[str, ...] = RESIZABLE_IO

    # ------------------------------------------------------------------------------ build
    @classmethod
    def build(cls, model: onnx.ModelProto, resizable_io: tuple[str, ...] = RESIZABLE_IO) -> "GraphAtoms":
        try:
            inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
        except Exception:  # shape inference is a help, not a requirement
            inferred = model
        self = cls(model=model, resizable_io=tuple(resizable_io))
        self._static = _static_shapes(inferred)
        graph = model.graph
        for init in graph.initializer:
            shape = tuple(int(d) for d in init.dims)
            self.initializer_shapes[init.name] = shape
            self.dims[init.name] = [[Atom(s)] for s in shape]
            if init.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32) and math.prod(shape) <= 64 \
                    and not init.external_data:
                self.values[init.name] = literal_values(init.name, numpy_helper.to_array(init))
        initializers = {i.name for i in graph.initializer}
        for value in graph.input:
            if value.name not in initializers:
                self.dims[value.name] = [[Atom(d.dim_value or None)] for d in value.type.tensor_type.shape.dim]
        for index, node in enumerate(graph.node):
            for name in node.input:
                if name in initializers:
                    self.consumers.setdefault(name, []).append(node.name or node.op_type)
            self._node_index = index
            self._apply(node)
        for value in list(graph.input) + list(graph.output):
            if value.name in initializers or any(fnmatch.fnmatch(value.name, p) for p in self.resizable_io):
                continue
            for dim in self.dims.get(value.name, []):
                freeze_dim(dim, f"reaches the graph {'input' if value in graph.input else 'output'} {value.name!r}")
        return self

    # ------------------------------------------------------------------------------ helpers
    def _fresh(self, name: str, frozen: str | None = None, rank: int | None = None) -> Dims:
        shape = self._static.get(name)
        if shape is None:
            shape = [None] * (rank or 0)
        dims = [[Atom(s if isinstance(s, int) and s > 0 else None, frozen)] for s in shape]
        self.dims[name] = dims
        return dims

    def _attrs(self, node) -> dict:
        return {a.name: helper.get_attribute_value(a) for a in node.attribute}

    def _ints(self, name: str) -> list[int] | None:
        values = self.values.get(name)
        if values is None or not all(isinstance(v, Lit) for v in values):
            return None
        return [v.value for v in values]

    def _set_role(self, name: str, axis: int, role: str) -> None:
        if name in self.initializer_shapes:
            key = (name, axis % len(self.initializer_shapes[name]))
            if key not in self.roles or self.roles[key] == "channel":
                self.roles[key] = role

    def _freeze_node(self, node, reason: str) -> None:
        for name in node.input:
            for dim in self.dims.get(name, []):
                freeze_dim(dim, reason)
        for name in node.output:
            self._fresh(name, frozen=reason)

    def _apply(self, node) -> None:
        attrs = self._attrs(node)
        if node.op_type == "Constant":
            array = _constant_array(attrs)
            if array is not None and array.dtype.kind in "iu" and array.size <= 64:
                self.values[node.output[0]] = literal_values(node.output[0], array)
        elif node.output and node.op_type not in ("Constant",):
            inputs = [self.values.get(name) for name in node.input]
            value = evaluate(node, inputs, attrs, lambda n: self.dims.get(n))
            if value is not None:
                self.values[node.output[0]] = value
        if node.domain not in ("", "ai.onnx", "com.microsoft"):
            return self._unknown(node)
        rule = getattr(self, f"_rule_{node.op_type}", None)
        try:
            if rule is not None:
                rule(node, attrs)
            elif node.op_type in UNARY:
                self._unary(node)
            elif node.op_type in BROADCAST:
                self._broadcast(node)
            elif node.op_type in REDUCE:
                self._reduce(node, attrs)
            elif node.op_type in NORMS:
                self._norm(node, attrs)
            elif node.op_type in POOLS:
                self._pool(node)
            elif node.op_type in SOURCES:
                for name in node.output:
                    self._fresh(name)
            else:
                self._unknown(node)
        except AtomConflict as conflict:
            self._freeze_node(node, f"{node.op_type} {node.name!r}: {conflict}")

    def _unknown(self, node) -> None:
        self.unknown_ops[node.op_type] = self.unknown_ops.get(node.op_type, 0) + 1
        self._freeze_node(node, f"no grouping rule for {node.op_type} ({node.name!r})")

    def _input(self, node, k: int) -> Dims | None:
        if k >= len(node.input) or not node.input[k]:
            return None
        return self.dims.get(node.input[k])

    # ------------------------------------------------------------------------------ elementwise
    def _unary(self, node) -> None:
        source = self._input(node, 0)
        if source is None:
            return self._unknown(node)
        self.dims[node.output[0]] = [list(d) for d in source]
        for extra in node.output[1:]:  # Dropout's mask
            self._fresh(extra)

    def _broadcast(self, node) -> None:
        operands = [(name, self.dims.get(name)) for name in node.input if name]
        if any(d is None for _, d in operands):
            return self._unknown(node)
        rank = max(len(d) for _, d in operands)
        out: Dims = []
        for k in range(rank):
            axis_dims = []
            for name, dims in operands:
                j = len(dims) - rank + k
                if j < 0:
                    continue
                if size_of(dims[j]) != 1:
                    axis_dims.append((name, j, dims[j]))
            if not axis_dims:
                out.append([Atom(1)])
                continue
            first = axis_dims[0][2]
            for name, j, dim in axis_dims[1:]:
                unify_dims(first, dim)
            for name, j, _ in axis_dims:
                self._set_role(name, j, "channel")
            out.append(list(first))
        self.dims[node.output[0]] = out

    # ------------------------------------------------------------------------------ linear algebra
    def _rule_MatMul(self, node, attrs) -> None:
        a, b = self._input(node, 0), self._input(node, 1)
        if a is None or b is None or len(a) < 2 or len(b) < 2:
            return self._unknown(node)
        unify_dims(a[-1], b[-2])
        batch_rank = max(len(a), len(b)) - 2
        batch: Dims = []
        for k in range(batch_rank):
            ja, jb = len(a) - 2 - batch_rank + k, len(b) - 2 - batch_rank + k
            da = a[ja] if ja >= 0 and size_of(a[ja]) != 1 else None
            db = b[jb] if jb >= 0 and size_of(b[jb]) != 1 else None
            if da is not None and db is not None:
                unify_dims(da, db)
            batch.append(list(da or db or [Atom(1)]))
        self.dims[node.output[0]] = batch + [list(a[-2]), list(b[-1])]
        for name, dims in ((node.input[0], a), (node.input[1], b)):
            if name in self.initializer_shapes:
                self._set_role(name, len(dims) - 2, "consumer" if name == node.input[1] else "producer")
                self._set_role(name, len(dims) - 1, "producer" if name == node.input[1] else "consumer")

    def _rule_Gemm(self, node, attrs) -> None:
        a, b = self._input(node, 0), self._input(node, 1)
        if a is None or b is None or len(a) != 2 or len(b) != 2:
            return self._unknown(node)
        ka, ma = (0, 1) if attrs.get("transA", 0) else (1, 0)
        kb, nb = (1, 0) if attrs.get("transB", 0) else (0, 1)
        unify_dims(a[ka], b[kb])
        out = [list(a[ma]), list(b[nb])]
        self._set_role(node.input[1], kb, "consumer")
        self._set_role(node.input[1], nb, "producer")
        c = self._input(node, 2)
        if c is not None:
            for j in range(len(c)):
                if size_of(c[j]) != 1:
                    unify_dims(out[2 - len(c) + j], c[j])
                    self._set_role(node.input[2], j, "channel")
        self.dims[node.output[0]] = out

    def _rule_Conv(self, node, attrs) -> None:
        x, w = self._input(node, 0), self._input(node, 1)
        if x is None or w is None or node.input[1] not in self.initializer_shapes:
            return self._unknown(node)
        group = int(attrs.get("group", 1))
        out = self._fresh(node.output[0], rank=len(x))
        out[0] = list(x[0])
        in_channels, per_group = size_of(x[1]), self.initializer_shapes[node.input[1]][1]
        if group == 1:
            unify_dims(x[1], w[1])
            self._set_role(node.input[1], 1, "consumer")
            out[1] = list(w[0])
            self._set_role(node.input[1], 0, "producer")
        elif per_group == 1 and in_channels == group and self.initializer_shapes[node.input[1]][0] == group:
            unify_dims(x[1], w[0])  # depthwise: channel c reads only input channel c
            self._set_role(node.input[1], 0, "channel")
            out[1] = list(x[1])
        else:
            freeze_dim(x[1], f"grouped Conv {node.name!r} (group={group}) couples channels in blocks")
            freeze_dim(w[0], f"grouped Conv {node.name!r}")
            out[1] = [Atom(self.initializer_shapes[node.input[1]][0], f"grouped Conv {node.name!r}")]
        bias = self._input(node, 2)
        if bias is not None:
            unify_dims(out[1], bias[0])
            self._set_role(node.input[2], 0, "channel")

    def _rule_BatchNormalization(self, node, attrs) -> None:
        x = self._input(node, 0)
        if x is None:
            return self._unknown(node)
        for k in range(1, 5):
            param = self._input(node, k)
            if param is not None:
                unify_dims(x[1], param[0])
                self._set_role(node.input[k], 0, "channel")
        self.dims[node.output[0]] = [list(d) for d in x]
        for extra in node.output[1:]:
            self._fresh(extra)

    def _norm(self, node, attrs) -> None:
        x = self._input(node, 0)
        if x is None:
            return self._unknown(node)
        axis = attrs.get("axis", -1) % len(x)
        for dim in x[axis:]:
            freeze_dim(dim, f"{node.op_type} normalises over this axis (statistics mix channels)")
        for k in range(1, len(node.input)):
            param = self._input(node, k)
            if param is None or node.input[k] not in self.initializer_shapes:
                continue
            for j in range(len(param)):
                unify_dims(x[len(x) - len(param) + j], param[j])
                self._set_role(node.input[k], j, "channel")
        self.dims[node.output[0]] = [list(d) for d in x]
        for extra in node.output[1:]:
            self._fresh(extra)

    def _pool(self, node) -> None:
        x = self._input(node, 0)
        if x is None:
            return self._unknown(node)
        out = self._fresh(node.output[0], rank=len(x))
        out[0], out[1] = list(x[0]), list(x[1])

    # ------------------------------------------------------------------------------ reductions
    def _axes(self, node, attrs, rank: int) -> list[int] | None:
        if "axes" in attrs:
            return [a % rank for a in attrs["axes"]]
        if len(node.input) > 1 and node.input[1]:
            axes = self._ints(node.input[1])
            return None if axes is None else [a % rank for a in axes]
        if "axis" in attrs:
            return [attrs["axis"] % rank]
        return list(range(rank))

    def _reduce(self, node, attrs) -> None:
        x = self._input(node, 0)
        axes = self._axes(node, attrs, len(x)) if x is not None else None
        if x is None or axes is None:
            return self._unknown(node)
        for a in axes:
            freeze_dim(x[a], f"{node.op_type} {node.name!r} reduces over this axis")
        keep = attrs.get("keepdims", 1)
        self.dims[node.output[0]] = [([Atom(1)] if k in axes else list(d)) for k, d in enumerate(x)
                                     if keep or k not in axes]

    def _rule_Softmax(self, node, attrs) -> None:
        x = self._input(node, 0)
        if x is None:
            return self._unknown(node)
        freeze_dim(x[attrs.get("axis", -1) % len(x)], f"{node.op_type} {node.name!r} normalises over this axis")
        self.dims[node.output[0]] = [list(d) for d in x]

    _rule_LogSoftmax = _rule_Softmax

    def _rule_ArgMax(self, node, attrs) -> None:
        self._reduce(node, {**attrs, "axes": [attrs.get("axis", 0)]})

    _rule_ArgMin = _rule_ArgMax

    # ------------------------------------------------------------------------------ layout
    def _rule_Transpose(self, node, attrs) -> None:
        x = self._input(node, 0)
        if x is None:
            return self._unknown(node)
        perm = attrs.get("perm", list(reversed(range(len(x)))))
        self.dims[node.output[0]] = [list(x[p]) for p in perm]

    def _rule_Unsqueeze(self, node, attrs) -> None:
        x = self._input(node, 0)
        if x is None:
            return self._unknown(node)
        axes = attrs.get("axes") if "axes" in attrs else self._ints(node.input[1]) if len(node.input) > 1 else None
        if axes is None:
            return self._unknown(node)
        rank = len(x) + len(axes)
        axes = sorted(a % rank for a in axes)
        out, it = [], iter(x)
        for k in range(rank):
            out.append([Atom(1)] if k in axes else list(next(it)))
        self.dims[node.output[0]] = out

    def _rule_Squeeze(self, node, attrs) -> None:
        x = self._input(node, 0)
        if x is None:
            return self._unknown(node)
        axes = attrs.get("axes") if "axes" in attrs else self._ints(node.input[1]) if len(node.input) > 1 and node.input[1] else None
        if axes is None:
            axes = [k for k, d in enumerate(x) if size_of(d) == 1]
        axes = [a % len(x) for a in axes]
        self.dims[node.output[0]] = [list(d) for k, d in enumerate(x) if k not in axes]

    def _rule_Flatten(self, node, attrs) -> None:
        x = self._input(node, 0)
        if x is None:
            return self._unknown(node)
        axis = attrs.get("axis", 1) % (len(x) + 1)
        self.dims[node.output[0]] = [[a for d in x[:axis] for a in d] or [Atom(1)],
                                     [a for d in x[axis:] for a in d] or [Atom(1)]]

    def _rule_Reshape(self, node, attrs) -> None:
        x = self._input(node, 0)
        target = self.values.get(node.input[1])
        if x is None:
            return self._unknown(node)
        if target is None:
            static = self._static.get(node.output[0])
            if static is None or not all(isinstance(s, int) and s > 0 for s in static):
                return self._freeze_node(node, f"Reshape {node.name!r}: target shape not known")
            target = [Lit(s) for s in static]
        if not attrs.get("allowzero", 0):
            target = [DimRef(tuple(x[k])) if isinstance(e, Lit) and e.value == 0 else e for k, e in enumerate(target)]
        self.dims[node.output[0]] = self._align(node, x, target)

    def _align(self, node, x: Dims, target: list[Element]) -> Dims:
        """Output axes of a reshape of ``x`` to ``target``: each element takes the next leaves of
        ``x`` (from the front before a -1, from the back after it; -1 takes what is left)."""
        pool = [leaf for leaf in dim_leaves([a for d in x for a in d]) if leaf.size != 1]
        wild = [k for k, e in enumerate(target) if isinstance(e, Lit) and e.value == -1]
        if len(wild) > 1:
            raise AtomConflict("more than one -1")
        cut = wild[0] if wild else len(target)
        out: list[list[Atom] | None] = [None] * len(target)
        for k in range(cut):
            out[k], pool = self._take(node, k, target[k], pool)
        tail = list(reversed(range(cut + 1, len(target)))) if wild else []
        for k in tail:
            reversed_pool = list(reversed(pool))
            taken, rest = self._take(node, k, target[k], reversed_pool, from_back=True)
            out[k], pool = list(reversed(taken)), list(reversed(rest))
        if wild:
            out[cut] = pool or [Atom(1)]
            pool = []
        if pool:
            raise AtomConflict("reshape leaves factors unused")
        return [d for d in out]

    def _take(self, node, k: int, element: Element, pool: list[Atom], from_back: bool = False):
        if isinstance(element, Lit):
            if element.value == 1:
                return [Atom(1)], pool
            taken, rest = take_leaves(pool, element.value, inner_first=from_back)
            self.literal_uses.append(LiteralUse(self._node_index, k, element.source, taken))
            return taken, rest
        if isinstance(element, DimRef):
            ref = [leaf for leaf in dim_leaves(list(element.atoms)) if leaf.size != 1]
            if not ref:
                return [Atom(1)], pool
            size = size_of(ref)
            if size is not None and all(leaf.size is not None for leaf in pool[:len(ref)]):
                taken, rest = take_leaves(pool, size, inner_first=from_back)
            else:
                if len(pool) < len(ref):
                    raise AtomConflict("reshape runs out of factors")
                taken, rest = pool[:len(ref)], pool[len(ref):]
            unify_dims(list(reversed(ref)) if from_back else ref, taken)
            return taken, rest
        if not pool or pool[0].size is not None:
            raise AtomConflict("symbolic target dimension over a known size")
        return pool[:1], pool[1:]

    def _rule_Expand(self, node, attrs) -> None:
        x = self._input(node, 0)
        target = self.values.get(node.input[1])
        if x is None or target is None:
            return self._freeze_node(node, f"Expand {node.name!r}: target shape not known")
        rank = max(len(x), len(target))
        out: Dims = []
        for k in range(rank):
            j, t = k - (rank - len(x)), k - (rank - len(target))
            dim = x[j] if j >= 0 else [Atom(1)]
            element = target[t] if t >= 0 else Lit(1)
            if size_of(dim) == 1 and not (isinstance(element, Lit) and element.value == 1):
                if isinstance(element, Lit):
                    new = [Atom(element.value)]
                    self.literal_uses.append(LiteralUse(self._node_index, t, element.source, new))
                elif isinstance(element, DimRef):
                    new = list(element.atoms)
                else:
                    new = [Atom(None)]
                out.append(new)
            else:
                if isinstance(element, Lit) and element.value > 1:  # restates the axis: follows its pruning
                    self.literal_uses.append(LiteralUse(self._node_index, t, element.source, list(dim)))
                out.append(list(dim))
        self.dims[node.output[0]] = out

    # ------------------------------------------------------------------------------ slicing, joining
    def _rule_Slice(self, node, attrs) -> None:
        x = self._input(node, 0)
        if x is None:
            return self._unknown(node)
        axes = self._ints(node.input[3]) if len(node.input) > 3 and node.input[3] else list(range(len(x)))
        out = self._fresh(node.output[0], rank=len(x))
        if axes is None:
            return self._freeze_node(node, f"Slice {node.name!r}: axes not known")
        axes = [a % len(x) for a in axes]
        for k in range(len(x)):
            if k in axes:
                freeze_dim(x[k], f"Slice {node.name!r} cuts this axis")
                freeze_dim(out[k], f"Slice {node.name!r} cuts this axis")
            else:
                out[k] = list(x[k])

    def _join(self, node, axis: int, parts: list[Dims], outputs: list[str]) -> None:
        rank = len(parts[0])
        axis %= rank
        for k in range(rank):
            if k == axis:
                for dims in parts:
                    freeze_dim(dims[k], f"{node.op_type} {node.name!r} joins or splits along this axis")
                continue
            for dims in parts[1:]:
                unify_dims(parts[0][k], dims[k])
        for name in outputs:
            out = self._fresh(name, rank=rank)
            for k in range(rank):
                if k == axis:
                    freeze_dim(out[k], f"{node.op_type} {node.name!r} joins or splits along this axis")
                else:
                    out[k] = list(parts[0][k])

    def _rule_Concat(self, node, attrs) -> None:
        parts = [self.dims.get(name) for name in node.input if name]
        if any(p is None for p in parts) or len({len(p) for p in parts}) != 1:
            return self._unknown(node)
        self._join(node, attrs["axis"], parts, [node.output[0]])

    def _rule_Split(self, node, attrs) -> None:
        x = self._input(node, 0)
        if x is None:
            return self._unknown(node)
        self._join(node, attrs.get("axis", 0), [x], list(node.output))

    def _rule_Gather(self, node, attrs) -> None:
        data, index = self._input(node, 0), self._input(node, 1)
        if data is None or index is None:
            return self._unknown(node)
        axis = attrs.get("axis", 0) % len(data)
        freeze_dim(data[axis], f"Gather {node.name!r} selects along this axis")
        self.dims[node.output[0]] = [list(d) for d in data[:axis]] + [list(d) for d in index] + \
            [list(d) for d in data[axis + 1:]]
        if node.input[0] in self.initializer_shapes:
            for j in range(len(data)):
                if j != axis:
                    self._set_role(node.input[0], j, "producer")

    def _rule_Shape(self, node, attrs) -> None:
        self._fresh(node.output[0], rank=1)

    _rule_Size = _rule_Shape

    def _rule_Trilu(self, node, attrs) -> None:
        x = self._input(node, 0)
        if x is None:
            return self._unknown(node)
        for dim in x[-2:]:
            freeze_dim(dim, f"Trilu {node.name!r} masks by position")
        self.dims[node.output[0]] = [list(d) for d in x]


def _constant_array(attrs: dict):
    """The value of a Constant node, whichever attribute holds it (None for sparse or string values)."""
    if "value" in attrs:
        return numpy_helper.to_array(attrs["value"])
    if "value_ints" in attrs:
        return np.array(attrs["value_ints"], dtype=np.int64)
    if "value_int" in attrs:
        return np.array(attrs["value_int"], dtype=np.int64)
    return None


def _static_shapes(model: onnx.ModelProto) -> dict[str, list[int | str | None]]:
    shapes = {}
    for value in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        t = value.type.tensor_type
        if t.HasField("shape"):
            shapes[value.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
    return shapes
