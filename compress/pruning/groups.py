"""Coupled-channel groups of any model: what SPA's ONNX grouping and the torch-pruning twin produce.

A *group* is a set of parameter slices that must be removed together. It has ``units`` prunable
units (a channel, or a head of ``block`` channels). Removing unit ``u`` removes, in every member
slice, the indices ``offset + r·stride + u·block + j`` (``r < repeat``, ``j < block``) along that
slice's ``axis``. ``repeat`` > 1 describes an inner factor of an axis: the s-th query head of every
KV group is ``repeat = kv_heads``, ``stride = heads_per_kv·head_dim``, ``block = head_dim``.

Example: an MLP channel group of a transformer layer holds gate_proj and up_proj rows (axis 0 of
the [out, in] weight; role "producer"), the down_proj column (axis 1 of its [out, in] weight; role
"consumer") and nothing else. A head group has block = head_dim.

A frozen group (``frozen`` gives the reason) is listed but never pruned: something the grouping
rules do not understand touches it, or it reaches a graph input or output.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

ROLES = ("producer", "consumer", "channel")  # rows that make the channel, columns that read it, per-channel vectors


@dataclass(frozen=True)
class ParamSlice:
    """The part of one parameter tensor a group owns.

    tensor: parameter name (``model.layers.0.mlp.up_proj.weight``) or ONNX initializer name.
    axis: the axis the group's channels run along in that tensor.
    block: channels per unit on that axis (head_dim for heads, 1 for plain channels).
    offset: first channel of the group on that axis (non-zero after a Concat or inside a Split).
    role: "producer" (output rows), "consumer" (input columns) or "channel" (bias, norm scale, ...).
    repeat, stride: the unit's block recurs ``repeat`` times, ``stride`` channels apart.
    """

    tensor: str
    axis: int
    block: int = 1
    offset: int = 0
    role: str = "producer"
    repeat: int = 1
    stride: int = 0

    def indices(self, units: list[int] | torch.Tensor) -> torch.Tensor:
        """[repeat·len(units)·block] sorted indices along ``axis`` of the given units."""
        units = torch.as_tensor(units, dtype=torch.long).reshape(-1)
        within = torch.arange(self.block, dtype=torch.long)
        outer = torch.arange(self.repeat, dtype=torch.long) * self.stride
        index = self.offset + outer[:, None, None] + units[None, :, None] * self.block + within[None, None, :]
        return index.reshape(-1).sort().values


@dataclass
class ChannelGroup:
    """One set of coupled channels. ``units``: how many can be removed one by one."""

    id: int
    units: int
    slices: list[ParamSlice] = field(default_factory=list)
    frozen: str | None = None
    label: str = ""

    @property
    def prunable(self) -> bool:
        return self.frozen is None and self.units > 0 and any(s.role != "channel" for s in self.slices)

    def unit_cost(self, shapes: dict[str, tuple[int, ...]]) -> int:
        """Parameters removed with one unit: per slice, ``block`` times the tensor's size over ``axis``."""
        cost = 0
        for s in self.slices:
            shape = shapes[s.tensor]
            per_index = 1
            for axis, size in enumerate(shape):
                if axis != s.axis % len(shape):
                    per_index *= size
            cost += s.block * s.repeat * per_index
        return cost

    def to_dict(self) -> dict:
        return {"id": self.id, "units": self.units, "frozen": self.frozen, "label": self.label,
                "slices": [asdict(s) for s in self.slices]}

    @classmethod
    def from_dict(cls, data: dict) -> "ChannelGroup":
        return cls(id=int(data["id"]), units=int(data["units"]), frozen=data.get("frozen"), label=data.get("label", ""),
                   slices=[ParamSlice(**s) for s in data.get("slices", [])])


def magnitude_scores(group: ChannelGroup, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """[units] float64 group L2 magnitude over the weights that make and read the channels (producer
    and consumer slices; biases and norm statistics are not importance): per slice, the squared norm
    of each unit's indices divided by the tensor's mean squared value per unit (so large tensors do
    not dominate), summed over slices, then the square root."""
    total = torch.zeros(group.units, dtype=torch.float64)
    for s in group.slices:
        if s.role == "channel":
            continue
        t = tensors[s.tensor].detach().to(torch.float64)
        axis = s.axis % t.dim()
        moved = t.movedim(axis, 0).reshape(t.shape[axis], -1)
        per_index = moved.square().sum(dim=1)  # [axis size]
        per_unit = torch.stack([per_index[s.indices([u])].sum() for u in range(group.units)])
        norm = per_index.sum() / max(1, per_index.numel() // (s.block * s.repeat))
        total += per_unit / norm if norm > 0 else per_unit
    return total.sqrt()


def describe(groups: list[ChannelGroup], shapes: dict[str, tuple[int, ...]]) -> list[dict]:
    """Rows for ``compress inspect``: id, label, units, block, parameters per unit, members, status."""
    rows = []
    for g in groups:
        rows.append({
            "id": g.id,
            "label": g.label,
            "units": g.units,
            "block": max((s.block for s in g.slices), default=1),
            "unit_cost": g.unit_cost(shapes) if all(s.tensor in shapes for s in g.slices) else None,
            "members": len(g.slices),
            "status": "prunable" if g.prunable else f"frozen: {g.frozen or 'no weights to remove'}",
        })
    return rows
