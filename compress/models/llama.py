"""Adapter for gated-MLP decoders with q/k/v/o and gate/up/down linears (and our `pruned_llama`).

Families (``DECODER_FAMILIES``, one row per difference that matters to pruning):

* Llama, Mistral, Qwen2/Qwen2.5 (q/k/v biases), Qwen3 (per-head q/k RMSNorm over head_dim);
* Gemma, Gemma 2, Gemma 3 text (head_dim not hidden/heads, often one KV head, sliding-window
  layers, soft-capping, scaled embeddings: all in the stock modules, untouched by slicing);
* OLMo-2 (q/k RMSNorm over the whole projection: sliced with the heads, ``projection_norms``);
* Granite (embedding/residual/attention/logit multipliers: scalars, untouched by slicing);
* Phi-3 is unfused at load (:mod:`compress.models.phi3`) into the Mistral layout.

All architecture knowledge the passes need lives here: which linear is q/k/v/o and gate/up/down,
how query heads map to KV heads (GQA), and what each prunable group costs in parameters. Widths
are read from the modules, not the config, so the adapter describes pruned models correctly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from compress.models.families import DECODER_FAMILIES

SUPPORTED_MODEL_TYPES = tuple(DECODER_FAMILIES)


@dataclass(frozen=True)
class LayerWidths:
    """Widths of one decoder layer: query heads, KV heads, MLP channels."""

    heads: int
    kv_heads: int
    intermediate: int

    @property
    def heads_per_kv(self) -> int:
        return self.heads // self.kv_heads if self.kv_heads else 0


class LlamaFamilyAdapter:
    """Names the parts of a LLaMA-style causal LM and prices its prunable groups.

    Prunable groups (FLAP units):
      * query head: ``head_dim`` rows of q_proj and the matching columns of o_proj;
      * KV group: one KV head (``head_dim`` rows of k_proj and v_proj) with its query heads;
      * MLP channel: one row of gate_proj and up_proj and one column of down_proj.
    """

    family = "llama"

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        self.decoder = model.model
        self.layers: nn.ModuleList = model.model.layers
        first_attn = self.layers[0].self_attn
        self.head_dim: int = int(first_attn.head_dim)
        self.hidden_size: int = int(self.decoder.embed_tokens.weight.shape[1])

    # ----------------------------------------------------------------------------- modules
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def attention(self, layer_index: int) -> nn.Module:
        return self.layers[layer_index].self_attn

    def mlp(self, layer_index: int) -> nn.Module:
        return self.layers[layer_index].mlp

    def attention_linears(self, layer_index: int) -> dict[str, nn.Linear]:
        attn = self.attention(layer_index)
        return {"q_proj": attn.q_proj, "k_proj": attn.k_proj, "v_proj": attn.v_proj, "o_proj": attn.o_proj}

    def mlp_linears(self, layer_index: int) -> dict[str, nn.Linear]:
        mlp = self.mlp(layer_index)
        return {"gate_proj": mlp.gate_proj, "up_proj": mlp.up_proj, "down_proj": mlp.down_proj}

    def projection_norms(self, layer_index: int) -> dict[str, nn.Module]:
        """Norms that normalise a whole projection's output and so lose its rows with the heads,
        keyed by that projection: OLMo-2's q_norm [H·D] and k_norm [K·D]. Per-head norms (Qwen3,
        Gemma 3: [D]) are shared by every head and stay whole; they are not listed."""
        attn = self.attention(layer_index)
        norms = {}
        for projection, name in (("q_proj", "q_norm"), ("k_proj", "k_norm")):
            weight = getattr(getattr(attn, name, None), "weight", None)
            width = getattr(attn, projection).out_features
            if weight is not None and weight.dim() == 1 and weight.numel() == width != self.head_dim:
                norms[projection] = getattr(attn, name)
        return norms

    def attention_consumer(self, layer_index: int) -> nn.Linear:
        """o_proj: reads the concatenated head outputs, [T, heads·head_dim]."""
        return self.attention(layer_index).o_proj

    def mlp_consumer(self, layer_index: int) -> nn.Linear:
        """down_proj: reads act(gate)·up, [T, intermediate]."""
        return self.mlp(layer_index).down_proj

    # ------------------------------------------------------------------------------ widths
    def widths(self, layer_index: int) -> LayerWidths:
        attn = self.attention(layer_index)
        return LayerWidths(
            heads=attn.q_proj.out_features // self.head_dim,
            kv_heads=attn.k_proj.out_features // self.head_dim,
            intermediate=self.mlp(layer_index).gate_proj.out_features,
        )

    def all_widths(self) -> list[LayerWidths]:
        return [self.widths(i) for i in range(self.num_layers)]

    def kv_head_of_query_heads(self, layer_index: int) -> torch.Tensor:
        """[heads] index of the KV head each query head reads (transformers' repeat_kv layout)."""
        widths = self.widths(layer_index)
        return torch.arange(widths.heads) // widths.heads_per_kv

    # ------------------------------------------------------------------------------- costs
    def query_head_cost(self, layer_index: int) -> int:
        """Parameters removed with one query head: its q_proj rows (+bias) and o_proj columns."""
        attn = self.attention(layer_index)
        d, h = self.head_dim, self.hidden_size
        return 2 * d * h + (d if attn.q_proj.bias is not None else 0)

    def kv_head_cost(self, layer_index: int) -> int:
        """Parameters removed with one KV head alone: its k_proj and v_proj rows (+biases)."""
        attn = self.attention(layer_index)
        d, h = self.head_dim, self.hidden_size
        bias = (d if attn.k_proj.bias is not None else 0) + (d if attn.v_proj.bias is not None else 0)
        return 2 * d * h + bias

    def kv_group_cost(self, layer_index: int) -> int:
        """One KV head with all its query heads: (2g + 2)·d·h for g query heads per KV head."""
        g = self.widths(layer_index).heads_per_kv
        return g * self.query_head_cost(layer_index) + self.kv_head_cost(layer_index)

    def channel_cost(self, layer_index: int) -> int:
        """One MLP channel: a gate_proj row, an up_proj row, a down_proj column (+ gate/up biases)."""
        mlp = self.mlp(layer_index)
        biases = int(mlp.gate_proj.bias is not None) + int(mlp.up_proj.bias is not None)
        return 3 * self.hidden_size + biases

    # ---------------------------------------------------------------------- parameter counts
    def decoder_linear_params(self) -> int:
        """Weights of q, k, v, o, gate, up, down over all layers (FLAP's ratio denominator)."""
        total = 0
        for i in range(self.num_layers):
            for linear in {**self.attention_linears(i), **self.mlp_linears(i)}.values():
                total += linear.weight.numel()
        return total

    def param_counts(self) -> dict[str, int]:
        """Parameters by part; tied embeddings are counted once."""
        return part_counts(self)

    def summary(self) -> dict:
        """What `compress inspect` prints: architecture, parameters by part, prunable groups."""
        widths = self.all_widths()
        w0 = widths[0]
        groups = [
            {
                "kind": "query_head",
                "per_layer": w0.heads,
                "cost_params": self.query_head_cost(0),
                "description": f"{self.head_dim} q_proj rows + {self.head_dim} o_proj columns",
            },
            {
                "kind": "kv_group",
                "per_layer": w0.kv_heads,
                "cost_params": self.kv_group_cost(0),
                "description": f"1 KV head (k/v rows) + its {w0.heads_per_kv} query heads",
            },
            {
                "kind": "mlp_channel",
                "per_layer": w0.intermediate,
                "cost_params": self.channel_cost(0),
                "description": "gate/up row + down_proj column",
            },
        ]
        return {
            "architecture": type(self.model).__name__,
            "family": self.config.model_type,
            "layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "head_dim": self.head_dim,
            "params": self.param_counts(),
            "groups": groups,
            "layer_widths": [
                {"index": i, "heads": w.heads, "kv_heads": w.kv_heads, "intermediate": w.intermediate}
                for i, w in enumerate(widths)
            ],
        }


def part_counts(adapter) -> dict[str, int]:
    """Parameters of a decoder by part (total, embedding, decoder_linear, attention, mlp, norms,
    lm_head); a parameter shared by two parts (tied embeddings) is counted in the first only.
    ``adapter`` names the parts: ``decoder``, ``layers``, ``attention(i)``, ``mlp(i)``."""
    seen: set[int] = set()

    def count(module: nn.Module) -> int:
        n = 0
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
        return n

    embedding = count(adapter.decoder.embed_tokens)
    attention = sum(count(adapter.attention(i)) for i in range(adapter.num_layers))
    mlp = sum(count(adapter.mlp(i)) for i in range(adapter.num_layers))
    norms = count(adapter.decoder.norm) + sum(
        count(m) for layer in adapter.layers for name, m in layer.named_children() if name not in ("self_attn", "mlp")
    )
    lm_head = count(adapter.model.lm_head) if hasattr(adapter.model, "lm_head") else 0
    return {
        "total": sum(p.numel() for p in {id(p): p for p in adapter.model.parameters()}.values()),
        "embedding": embedding,
        "decoder_linear": adapter.decoder_linear_params(),
        "attention": attention,
        "mlp": mlp,
        "norms": norms,
        "lm_head": lm_head,
    }
