"""Symbolic values of the small integer tensors that compute shapes (Shape → Slice → Concat → Reshape).

An element is a literal int (``Lit``, with the initializer or Constant it was read from, so
surgery can patch it), the atoms of some tensor's axis (``DimRef``, from a ``Shape`` op), or
``Opaque`` (a symbolic scalar computed some other way, e.g. ``past_seq + seq``).
"""

from __future__ import annotations

from dataclasses import dataclass

from compress.models.onnx_graph.atoms import Atom


@dataclass(frozen=True)
class Lit:
    value: int
    source: tuple[str, int] | None = None  # (tensor holding the literal, flat index), None if computed


@dataclass(frozen=True)
class DimRef:
    atoms: tuple[Atom, ...]


@dataclass(frozen=True)
class Opaque:
    pass


Element = Lit | DimRef | Opaque


def literal_values(name: str, array) -> list[Element]:
    return [Lit(int(v), (name, k)) for k, v in enumerate(array.reshape(-1).tolist())]


def _ints(values: list[Element] | None) -> list[int] | None:
    if values is None or not all(isinstance(v, Lit) for v in values):
        return None
    return [v.value for v in values]


def evaluate(node, inputs: list[list[Element] | None], attrs: dict, dims_of) -> list[Element] | None:
    """The value of ``node``'s first output when it is a shape computation we can follow."""
    op = node.op_type
    if op == "Shape":
        dims = dims_of(node.input[0])
        if dims is None:
            return None
        start, end = attrs.get("start", 0), attrs.get("end", len(dims))
        return [DimRef(tuple(d)) for d in dims[slice(start, end)]]
    first = inputs[0] if inputs else None
    if op in ("Identity", "Cast", "Squeeze", "Unsqueeze"):
        return first
    if op == "Reshape" and first is not None:  # a 1-D value reshaped to 1-D ([-1] or its own length) keeps its elements
        target = _ints(inputs[1]) if len(inputs) > 1 else None
        return first if target in ([-1], [len(first)]) or len(first) <= 1 else None
    if op == "Concat":
        if any(v is None for v in inputs):
            return None
        return [e for v in inputs for e in v]
    if op == "Slice" and first is not None:
        starts, ends = _ints(inputs[1]), _ints(inputs[2])
        steps = _ints(inputs[4]) if len(inputs) > 4 and inputs[4] is not None else [1]
        if starts is None or ends is None or steps is None or len(starts) != 1:
            return None
        return first[slice(starts[0], ends[0], steps[0])]
    if op == "Gather" and first is not None:
        index = _ints(inputs[1])
        if index is None:
            return None
        return [first[i] for i in index]
    if op in ("Add", "Sub", "Mul", "Div") and len(inputs) == 2:
        a, b = _ints(inputs[0]), _ints(inputs[1])
        if a is not None and b is not None and len(a) == len(b) == 1:
            x, y = a[0], b[0]
            result = {"Add": x + y, "Sub": x - y, "Mul": x * y, "Div": x // y if y else 0}[op]
            return [Lit(result)]
        if inputs[0] is not None and inputs[1] is not None and len(inputs[0]) == len(inputs[1]) == 1:
            return [Opaque()]
        return None
    return None
