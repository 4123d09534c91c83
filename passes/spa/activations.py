"""Calibration statistics from ONNX Runtime: what flows into each group's consumers.

For every consumer slice of a group (the input axis of a MatMul/Gemm weight), the node's data
input is added as a graph output; calibration batches are run through ONNX Runtime and the sum of
squares of each input channel is accumulated in float64. ``activation_scores`` turns them into
Wanda-sp unit scores: ``Σ_consumers Σ_{channels of the unit} ‖W[channel, :]‖₂ · sqrt(E[x²])``.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import helper

from compress.errors import CompressError
from compress.pruning.groups import ChannelGroup


def consumer_inputs(model: onnx.ModelProto, groups: list[ChannelGroup]) -> dict[str, str]:
    """initializer (a consumer weight of some group) -> the activation tensor the node multiplies it with."""
    wanted = {s.tensor for g in groups for s in g.slices if s.role == "consumer"}
    found = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in wanted:
            found[node.input[1]] = node.input[0]
        elif node.op_type == "Gemm" and node.input[1] in wanted:
            found[node.input[1]] = node.input[0]
    return found


def channel_energy(model: onnx.ModelProto, tensors: list[str], make_batches
                   ) -> tuple[dict[str, np.ndarray], int]:
    """Σ x² per last-axis channel of each tensor over every calibration batch (float64), and the
    number of rows (tokens) summed. ``make_batches(session_inputs)`` builds the feeds from the
    session's input descriptions (names, shapes)."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    for name in tensors:
        if name not in existing:
            probe.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise CompressError(f"ONNX Runtime cannot run the model to collect activations ({exc})") from None
    energy: dict[str, np.ndarray] = {}
    rows = 0
    for feeds in make_batches(session.get_inputs()):
        outputs = session.run(tensors, feeds)
        mask = feeds.get("attention_mask")
        for name, value in zip(tensors, outputs):
            flat = value.astype(np.float64)
            if mask is not None and flat.ndim == 3 and flat.shape[:2] == mask.shape:
                flat = flat[mask.astype(bool)]
            flat = flat.reshape(-1, flat.shape[-1])
            energy[name] = energy.get(name, 0.0) + np.square(flat).sum(0)
        rows += int(mask.sum()) if mask is not None else int(np.prod(outputs[0].shape[:-1]))
    return energy, rows


def activation_scores(group: ChannelGroup, tensors: dict[str, torch.Tensor], energy: dict[str, np.ndarray],
                      inputs: dict[str, str], rows: int) -> torch.Tensor:
    """[units] float64 Wanda-sp scores of one group from its consumers' weights and input energy."""
    total = torch.zeros(group.units, dtype=torch.float64)
    used = False
    for piece in group.slices:
        if piece.role != "consumer" or piece.tensor not in inputs or inputs[piece.tensor] not in energy:
            continue
        weight = tensors[piece.tensor].to(torch.float64)
        axis = piece.axis % weight.dim()
        row_norms = weight.movedim(axis, 0).reshape(weight.shape[axis], -1).norm(dim=1)  # [channels]
        rms = torch.from_numpy(np.sqrt(energy[inputs[piece.tensor]] / max(rows, 1)))
        if rms.numel() != row_norms.numel():
            continue
        per_channel = row_norms * rms
        total += torch.stack([per_channel[piece.indices([u])].sum() for u in range(group.units)])
        used = True
    if not used:
        raise CompressError(f"group {group.id} ({group.label}): no consumer MatMul/Gemm to measure activations at")
    return total
