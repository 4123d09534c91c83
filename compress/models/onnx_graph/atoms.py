"""Atoms: the factors a tensor axis is made of, merged by union-find as the graph couples them.

Every axis of every tensor is a list of atoms, outermost first; the axis size is the product of
their sizes. ``[B, T, 384]`` reshaped to ``[B, T, 6, 64]`` refines the 384-atom into a 6-atom and
a 64-atom, so the q_proj weight's output axis becomes ``[6, 64]`` and one head is one unit of the
6-atom with block 64. Ops that couple axes (elementwise ops, the contracted axis of a MatMul, a
Transpose...) unify atoms; ops that mix channels (a softmax, a reduction, a normalisation, a
Slice or Concat along the axis, an op without a rule) freeze them, with the reason.

An atom's size is an int, or None when symbolic (batch, sequence). Refinement lives on the class
root, so every member of a class sees it.
"""

from __future__ import annotations

import math
from itertools import count

_ids = count()


class Atom:
    __slots__ = ("id", "size", "parent", "parts", "frozen")

    def __init__(self, size: int | None, frozen: str | None = None):
        self.id = next(_ids)
        self.size = size
        self.parent: Atom | None = None
        self.parts: list[Atom] | None = None
        self.frozen = frozen

    def __repr__(self) -> str:
        return f"Atom#{self.id}({self.size}{', frozen' if self.frozen else ''})"


class AtomConflict(Exception):
    """Two axes were asked to be the same but cannot be (sizes or factorisations differ)."""


def find(atom: Atom) -> Atom:
    root = atom
    while root.parent is not None:
        root = root.parent
    while atom.parent is not None:  # path compression
        atom.parent, atom = root, atom.parent
    return root


def leaves(atom: Atom) -> list[Atom]:
    """The finest factors of an atom (class roots), outermost first."""
    root = find(atom)
    if root.parts is None:
        return [root]
    return [leaf for part in root.parts for leaf in leaves(part)]


def dim_leaves(dim: list[Atom]) -> list[Atom]:
    return [leaf for atom in dim for leaf in leaves(atom)]


def size_of(dim: list[Atom]) -> int | None:
    """Product of the leaf sizes; None if any is symbolic."""
    sizes = [leaf.size for leaf in dim_leaves(dim)]
    return None if any(s is None for s in sizes) else math.prod(sizes)


def freeze(atom: Atom, reason: str) -> None:
    for leaf in leaves(atom):
        if leaf.frozen is None:
            leaf.frozen = reason


def freeze_dim(dim: list[Atom], reason: str) -> None:
    for atom in dim:
        freeze(atom, reason)


def refine(atom: Atom, sizes: list[int]) -> list[Atom]:
    """Split a leaf into factors of the given sizes (product must equal its size)."""
    root = find(atom)
    if root.parts is not None:
        raise AtomConflict("refining an atom that is already refined")
    if root.size is not None and math.prod(sizes) != root.size:
        raise AtomConflict(f"cannot split {root.size} into {sizes}")
    root.parts = [Atom(s, root.frozen) for s in sizes]
    return root.parts


def union(a: Atom, b: Atom) -> None:
    """Make two leaves one class (sizes must agree; a symbolic size takes the other)."""
    ra, rb = find(a), find(b)
    if ra is rb:
        return
    if ra.size is not None and rb.size is not None and ra.size != rb.size:
        raise AtomConflict(f"sizes {ra.size} and {rb.size} differ")
    if ra.parts is not None or rb.parts is not None:
        raise AtomConflict("union of refined atoms; unify their leaves instead")
    rb.parent = ra
    if ra.size is None:
        ra.size = rb.size
    ra.frozen = ra.frozen or rb.frozen


def take_leaves(pool: list[Atom], size: int, inner_first: bool = False) -> tuple[list[Atom], list[Atom]]:
    """Split a leaf list into (the leading leaves whose product is ``size``, the rest).

    A leaf that overshoots is refined so that its matching factor is taken: the outer factor
    normally, the inner one with ``inner_first`` (for a list given innermost first, i.e. when
    taking from the back of an axis). Raises AtomConflict when the sizes do not line up.
    """
    pool = list(pool)
    product, taken = 1, 0
    while product < size:
        if taken >= len(pool) or pool[taken].size is None:
            raise AtomConflict("symbolic factor inside a known size")
        leaf = pool[taken]
        if product * leaf.size > size:
            need = size // product
            if size % product or leaf.size % need:
                raise AtomConflict(f"{leaf.size} does not split at {need}")
            if inner_first:
                outer, piece = refine(leaf, [leaf.size // need, need])
                pool[taken:taken + 1] = [piece, outer]
            else:
                piece, inner = refine(leaf, [need, leaf.size // need])
                pool[taken:taken + 1] = [piece, inner]
            leaf = piece
        product *= leaf.size
        taken += 1
    if product != size:
        raise AtomConflict("sizes do not line up")
    return pool[:taken], pool[taken:]


def unify_dims(a: list[Atom], b: list[Atom]) -> None:
    """Declare two axes identical: align their leaves (refining where one is coarser) and union
    them pairwise. Raises AtomConflict if they cannot be aligned."""
    la, lb = dim_leaves(a), dim_leaves(b)
    la = [x for x in la if x.size != 1]
    lb = [x for x in lb if x.size != 1]
    i = j = 0
    while i < len(la) or j < len(lb):
        if i >= len(la) or j >= len(lb):
            raise AtomConflict("one axis has factors left over")
        x, y = la[i], lb[j]
        if x is y:
            i += 1
            j += 1
            continue
        if x.size is None or y.size is None or x.size == y.size:
            union(x, y)
            i += 1
            j += 1
            continue
        # different known sizes: refine the larger one so its head matches the smaller
        if x.size > y.size:
            take_leaves([x], y.size)  # refines x into [y.size, rest]
            la[i:i + 1] = leaves(x)
        else:
            take_leaves([y], x.size)
            lb[j:j + 1] = leaves(y)
        x, y = la[i], lb[j]
        union(x, y)
        i += 1
        j += 1
