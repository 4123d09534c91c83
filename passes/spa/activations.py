"""Input statistics from ONNX Runtime: what flows into each group's consumers.

For every consumer slice of a group (the input axis of a MatMul/Gemm/Conv weight), the node's data
input is added as a graph output; batches are run through ONNX Runtime and, per input channel, the
sum of squares (and, for OBS, the whole second-moment matrix Σ x xᵀ) is accumulated in float64.
``activation_scores`` turns the energies into Wanda-sp unit scores:
``Σ_consumers Σ_{channels of the unit} ‖W[channel, :]‖₂ · sqrt(E[x²])``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import helper

from compress.errors import CompressError
from compress.pruning.groups import ChannelGroup


@dataclass(frozen=True)
class ConsumerInput:
    """The activation a consumer weight multiplies, and the axis of its channels in that activation
    (-1 for MatMul/Gemm, 1 for Conv's NCHW input)."""

    activation: str
    channel_axis: int


@dataclass
class InputStats:
    """Statistics of one activation over ``rows`` channel vectors (tokens, or pixels for a Conv):
    ``energy`` [C] = Σ x², and ``gram`` [C, C] = Σ x xᵀ when it was asked for (float64)."""

    energy: np.ndarray
    rows: int
    gram: np.ndarray | None = None


def consumer_inputs(model: onnx.ModelProto, groups: list[ChannelGroup]) -> dict[str, ConsumerInput]:
    """initializer (a consumer weight of some group) -> the activation the node multiplies it with."""
    wanted = {s.tensor for g in groups for s in g.slices if s.role == "consumer"}
    found = {}
    for node in model.graph.node:
        if len(node.input) < 2 or node.input[1] not in wanted:
            continue
        if node.op_type == "MatMul":
            found[node.input[1]] = ConsumerInput(node.input[0], -1)
        elif node.op_type == "Gemm" and not any(a.name == "transA" and a.i for a in node.attribute):
            found[node.input[1]] = ConsumerInput(node.input[0], -1)
        elif node.op_type == "Conv":
            found[node.input[1]] = ConsumerInput(node.input[0], 1)
    return found


def input_statistics(model: onnx.ModelProto, channel_axes: dict[str, int], make_batches, gram: bool = False
                     ) -> dict[str, InputStats]:
    """Statistics of each named activation (name -> its channel axis) over every batch.
    ``make_batches(session_inputs)`` builds the feeds from the session's input descriptions; an
    ``attention_mask`` feed of shape [batch, seq] drops padded tokens from [batch, seq, C] tensors."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    for name in channel_axes:
        if name not in existing:
            probe.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise CompressError(f"ONNX Runtime cannot run the model to collect activations ({exc})") from None
    names = sorted(channel_axes)
    stats: dict[str, InputStats] = {}
    for feeds in make_batches(session.get_inputs()):
        mask = feeds.get("attention_mask")
        for name, value in zip(names, session.run(names, feeds)):
            flat = np.moveaxis(value.astype(np.float64), channel_axes[name], -1)
            if mask is not None and flat.ndim == 3 and flat.shape[:2] == mask.shape:
                flat = flat[mask.astype(bool)]
            flat = flat.reshape(-1, flat.shape[-1])
            entry = stats.setdefault(name, InputStats(np.zeros(flat.shape[1]), 0,
                                                      np.zeros((flat.shape[1],) * 2) if gram else None))
            entry.energy += np.square(flat).sum(0)
            entry.rows += flat.shape[0]
            if gram:
                entry.gram += flat.T @ flat
    return stats


def consumer_matrix(weight: torch.Tensor, axis: int) -> torch.Tensor:
    """[rest, channels] view of a consumer weight with its input-channel axis last (a Conv's kernel
    positions become rows, so each row is one linear map of the channel vector)."""
    return weight.movedim(axis % weight.dim(), -1).reshape(-1, weight.shape[axis])


def activation_scores(group: ChannelGroup, tensors: dict[str, torch.Tensor], stats: dict[str, InputStats],
                      inputs: dict[str, ConsumerInput]) -> torch.Tensor:
    """[units] float64 Wanda-sp scores of one group from its consumers' weights and input energy."""
    total = torch.zeros(group.units, dtype=torch.float64)
    used = False
    for piece in group.slices:
        if piece.role != "consumer" or piece.tensor not in inputs or inputs[piece.tensor].activation not in stats:
            continue
        row_norms = consumer_matrix(tensors[piece.tensor].to(torch.float64), piece.axis).norm(dim=0)  # [channels]
        entry = stats[inputs[piece.tensor].activation]
        rms = torch.from_numpy(np.sqrt(entry.energy / max(entry.rows, 1)))
        if rms.numel() != row_norms.numel():
            continue
        per_channel = row_norms * rms
        total += torch.stack([per_channel[piece.indices([u])].sum() for u in range(group.units)])
        used = True
    if not used:
        raise CompressError(f"group {group.id} ({group.label}): no consumer MatMul/Gemm/Conv to measure "
                            "activations at")
    return total
