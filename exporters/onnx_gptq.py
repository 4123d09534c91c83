"""Data-aware 4-bit weights for the fused ONNX graph: GPTQ with integer zero points (MatMulNBits).

    linear_hessians(model, windows) -> {graph weight name: H [in, in] float64}
    gptq_quantize(weight [in, out], hessian [in, in], block_size) -> BlockQuant
    gptq_graph(proto, hessians, block_size, accuracy_level) -> how many MatMuls it rewrote

Round-to-nearest with integer zero points is what ONNX Runtime's fast CPU MatMulNBits kernel reads,
but on a small pruned model it costs much more than the weights' squared error suggests (SmolLM2
FLAP-50: perplexity ×1.18 against the float graph; down_proj, which reads the gated MLP activation
with its outlier channels, alone ×1.07). HQQ's float zero points recover it (×1.04) but send
MatMulNBits to a slow path. GPTQ (Frantar et al., 2023) keeps the fast format and spends the error
where the layer's inputs do not look: columns are quantized one at a time (blocks of ``block_size``
input channels get their scale and zero point from the weights as they stand when the block is
reached), and each column's rounding error is pushed onto the columns not yet quantized through
the inverse of H = Σ x xᵀ, the second moment of the linear's inputs on calibration windows.

Names: the Hessians are keyed by the fused graph's weight names (``layers.{i}.attn.qkv_proj.weight``
… :mod:`exporters.onnx_fused`); q, k and v share one input and so one H, as their packed MatMul does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

__all__ = ["BlockQuant", "gptq_graph", "gptq_quantize", "linear_hessians", "pack_matmul_nbits"]

DAMPING = 0.01  # of the mean diagonal of H, added to its diagonal
COLUMN_BLOCK = 128  # columns updated lazily together (GPTQ's block)


@dataclass
class BlockQuant:
    """4-bit codes of a [K, N] weight in MatMulNBits layout: q [N, blocks, block_size] (0..15),
    scales [N, blocks] float32, zero points [N, blocks] (0..15); ``dequantized`` [K, N] float32."""

    q: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray
    dequantized: np.ndarray


# ------------------------------------------------------------------------------ statistics
def _graph_names(layer: int) -> dict[str, str]:
    prefix = f"layers.{layer}"
    return {"q_proj": f"{prefix}.attn.qkv_proj.weight", "o_proj": f"{prefix}.attn.o_proj.weight",
            "gate_proj": f"{prefix}.mlp.gate_proj.weight", "up_proj": f"{prefix}.mlp.up_proj.weight",
            "down_proj": f"{prefix}.mlp.down_proj.weight"}


def linear_hessians(model: nn.Module, windows: torch.Tensor, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """H = Σ x xᵀ (float64, summed over every token of ``windows`` [n, T]) of the input of each
    decoder linear of ``model``, keyed by its fused-graph weight name. q/k/v and gate/up share
    their input: one H each for the packed q/k/v MatMul and for gate and up."""
    from compress.models.adapters import get_adapter

    adapter = get_adapter(model)
    sums: dict[str, torch.Tensor] = {}
    hooks = []

    def hook(name: str):
        def record(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
            if x.shape[-1]:
                sums[name] = sums.get(name, 0) + x.T @ x
        return record

    for i in range(adapter.num_layers):
        names = _graph_names(i)
        linears = {**adapter.attention_linears(i), **adapter.mlp_linears(i)}
        for part in ("q_proj", "o_proj", "gate_proj", "down_proj"):
            hooks.append(linears[part].register_forward_pre_hook(hook(names[part])))
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for batch in windows.split(batch_size):
                model(input_ids=batch.to(device))
    finally:
        for handle in hooks:
            handle.remove()
    for i in range(adapter.num_layers):
        names = _graph_names(i)
        if names["gate_proj"] in sums:
            sums[names["up_proj"]] = sums[names["gate_proj"]]
    return {name: h.cpu() for name, h in sums.items()}


# ------------------------------------------------------------------------------ GPTQ
def _block_params(columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit scale and integer zero point per row of ``columns`` [N, block] (0 kept exact)."""
    low = columns.amin(dim=1).clamp(max=0)
    high = columns.amax(dim=1).clamp(min=0)
    scale = ((high - low) / 15).clamp(min=1e-10)
    zero = torch.round(-low / scale).clamp(0, 15)
    return scale, zero


def gptq_quantize(weight: np.ndarray, hessian: torch.Tensor, block_size: int = 32, act_order: bool = False) -> BlockQuant:
    """GPTQ of ``weight`` [K, N] (MatMul layout: K inputs) against ``hessian`` [K, K]; blocks of
    ``block_size`` input channels, asymmetric 4 bits, integer zero points. ``act_order``: columns in
    order of decreasing H diagonal, each block's parameters fixed from the weights beforehand."""
    w = torch.from_numpy(np.ascontiguousarray(weight.T)).to(torch.float64)  # [N, K]: a row per output
    n_out, k = w.shape
    blocks = -(-k // block_size)
    h = hessian.to(torch.float64).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    q = torch.zeros(n_out, blocks * block_size, dtype=torch.float64)
    scales = torch.zeros(n_out, blocks, dtype=torch.float64)
    zeros = torch.zeros(n_out, blocks, dtype=torch.float64)
    order = torch.arange(k)
    if act_order:
        for b in range(blocks):
            scales[:, b], zeros[:, b] = _block_params(w[:, b * block_size:(b + 1) * block_size])
        order = torch.argsort(torch.diag(h), descending=True)
        w, h = w[:, order], h[order][:, order]
    h += torch.eye(k, dtype=torch.float64) * DAMPING * torch.diag(h).mean()
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    step = max(COLUMN_BLOCK, block_size)  # a multiple of block_size: no block crosses a lazy chunk
    for start in range(0, k, step):
        end = min(start + step, k)
        chunk = w[:, start:end].clone()
        errors = torch.zeros_like(chunk)
        hinv_chunk = hinv[start:end, start:end]
        for j in range(end - start):
            column = int(order[start + j])
            if not act_order and column % block_size == 0:
                # this block's parameters from the weights as they stand (earlier errors folded in)
                scales[:, column // block_size], zeros[:, column // block_size] = _block_params(chunk[:, j:j + block_size])
            b = column // block_size
            code = torch.clamp(torch.round(chunk[:, j] / scales[:, b] + zeros[:, b]), 0, 15)
            q[:, column] = code
            error = (chunk[:, j] - scales[:, b] * (code - zeros[:, b])) / hinv_chunk[j, j]
            chunk[:, j:] -= error.unsqueeze(1) * hinv_chunk[j, j:].unsqueeze(0)
            errors[:, j] = error
        w[:, end:] -= errors @ hinv[start:end, end:]
    q[:, k:] = zeros.repeat_interleave(block_size, dim=1)[:, k:]  # padding decodes to 0
    q3 = q.reshape(n_out, blocks, block_size)
    dequantized = (scales.unsqueeze(-1) * (q3 - zeros.unsqueeze(-1))).reshape(n_out, -1)[:, :k].T
    return BlockQuant(q=q3.to(torch.uint8).numpy(), scales=scales.to(torch.float32).numpy(),
                      zero_points=zeros.to(torch.uint8).numpy(), dequantized=dequantized.to(torch.float32).numpy())


def pack_matmul_nbits(quant: BlockQuant) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MatMulNBits' B [N, blocks, block_size / 2] (two codes a byte, low nibble first), scales
    [N · blocks] and packed zero points [N · ceil(blocks / 2)]."""
    q = quant.q
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    zeros = quant.zero_points
    if zeros.shape[1] % 2:
        zeros = np.concatenate([zeros, np.zeros((zeros.shape[0], 1), np.uint8)], axis=1)
    zero_points = (zeros[:, 0::2] | (zeros[:, 1::2] << 4)).astype(np.uint8).reshape(-1)
    return packed, quant.scales.reshape(-1).astype(np.float32), zero_points


def gptq_graph(proto, hessians: dict[str, torch.Tensor], block_size: int, accuracy_level: int,
               act_order: bool = True) -> int:
    """Replace every ``MatMul(x, W)`` of ``proto`` whose initializer W has a Hessian by a 4-bit
    ``MatMulNBits`` (GPTQ codes, integer zero points). Returns how many were replaced."""
    from onnx import helper, numpy_helper

    initializers = {t.name: t for t in proto.graph.initializer}
    replaced = 0
    nodes = list(proto.graph.node)
    for index, node in enumerate(nodes):
        name = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else None
        if name not in hessians or name not in initializers:
            continue
        weight = numpy_helper.to_array(initializers[name]).astype(np.float32)
        k, n = weight.shape
        packed, scales, zero_points = pack_matmul_nbits(gptq_quantize(weight, hessians[name], block_size, act_order))
        proto.graph.initializer.remove(initializers[name])
        proto.graph.initializer.extend([numpy_helper.from_array(packed, f"{name}_Q4"),
                                        numpy_helper.from_array(scales, f"{name}_scales"),
                                        numpy_helper.from_array(zero_points, f"{name}_zero_points")])
        attributes = {"K": k, "N": n, "bits": 4, "block_size": block_size}
        if accuracy_level:
            attributes["accuracy_level"] = accuracy_level
        nodes[index] = helper.make_node("MatMulNBits", [node.input[0], f"{name}_Q4", f"{name}_scales",
                                                        f"{name}_zero_points"], list(node.output),
                                        name=f"{node.name}_Q4", domain="com.microsoft", **attributes)
        replaced += 1
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    return replaced
