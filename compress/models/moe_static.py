"""A static, export-friendly form of the sparse MoE blocks.

The transformers expert loop visits only the experts some token picked (``expert_hit``, a
data-dependent ``nonzero``), which ``torch.export`` cannot turn into a fixed graph. The static form
runs every expert on every token and combines them with a dense routing matrix that is zero for
the experts the router did not pick:

    x [T, h] -> logits [T, E] -> top-k weights / ids (torch.topk, renormalised as the router does)
             -> W [T, E] (scatter; zero off the top-k)
    out[t] = sum_e W[t, e] * f_e(x_t)          (+ the shared expert, gated, for Qwen2-MoE)

It gives the same outputs as the stock forward (up to float summation order) at E / k times the
routed-expert FLOPs, so it is meant for the export trace only. Which router rule applies and which
shared expert a block has come from the MoE adapter (``compress/models/moe.py``).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from compress.models.moe import MoeAdapter, MoeLayer

__all__ = ["StaticMoeBlock", "install_static_moe_blocks", "static_moe_blocks"]


class StaticMoeBlock(nn.Module):
    """Stands in for one sparse block (``layer.mlp``); forward(hidden [b, s, h]) -> [b, s, h].

    The original block's router, experts and shared-expert modules are registered under their
    original names (``gate``, ``experts``, ``shared_expert``, …), so parameter names do not change.
    """

    def __init__(self, layer: MoeLayer):
        super().__init__()
        for name in ("gate", "experts", *layer.shared):
            setattr(self, name, getattr(layer.block, name))
        self.layer = layer  # plain attribute: the adapter's view of the same modules

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # [T, h]
        weights = self.layer.routing_matrix(x)  # [T, E], float32
        outputs = self.layer.experts.all_outputs(x)  # [E, T, h]
        # As the stock loop: each expert's output times its weight (in the promoted dtype), cast
        # back, then summed over experts in the model dtype.
        weighted = (outputs * weights.transpose(0, 1).unsqueeze(-1)).to(x.dtype)
        out = weighted.sum(dim=0)  # [T, h]
        shared = self.layer.shared_output(x)
        if shared is not None:
            out = out + shared
        return out.reshape(shape)


def install_static_moe_blocks(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """Replace every sparse block of ``model`` (Mixtral / Qwen2-MoE / Qwen3-MoE, stock or pruned_moe)
    by its StaticMoeBlock; returns (decoder layer, original block) pairs to restore them."""
    adapter = MoeAdapter(model)
    replaced = []
    for layer in adapter.moe_layers():
        decoder_layer = adapter.layers[layer.index]
        replaced.append((decoder_layer, decoder_layer.mlp))
        decoder_layer.mlp = StaticMoeBlock(layer)
    return replaced


@contextlib.contextmanager
def static_moe_blocks(model: nn.Module) -> Iterator[nn.Module]:
    """``with static_moe_blocks(model):`` the sparse blocks run in static form; restored on exit."""
    replaced = install_static_moe_blocks(model)
    try:
        yield model
    finally:
        for decoder_layer, block in replaced:
            decoder_layer.mlp = block
