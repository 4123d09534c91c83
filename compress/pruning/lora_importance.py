"""Unit importance while training with LoRA (LoRAPrune): one score per query head and per MLP channel.

Two estimators of how much the loss depends on each unit, read at every optimizer step:

* :class:`LoraGradientScorer` — LoRAPrune's ``lora`` metric. The weight gradient is estimated from
  the adapter's own gradients, ``G_BA = dB·A + B·dA - dB·dA`` [out, in], so ``dL/dW`` is never formed;
  element importance is ``|G_BA ⊙ (W + s·B·A)|``, summed over each unit's rows (q/k/v/gate/up) or
  columns (o/down), abs before the sum.
* :class:`TaylorScorer` — the ``exact`` group Taylor score ``|Σ_group W ⊙ dL/dW|`` without ``dL/dW``:
  for an output row i of a linear, ``Σ_in W[i, :]·G[i, :] = Σ_t y[t, i]·dL/dy[t, i]``; for an input
  column j, ``Σ_t x[t, j]·dL/dx[t, j]``. Forward hooks record both; the sum over a unit is signed,
  the abs is taken per unit. Exact for the (adapter-included) effective weight, with or without LoRA.

Both return, per layer, a dict role -> unit vector (q/o: [heads], k/v: [kv_heads], gate/up/down:
[intermediate]), float64. :class:`UnitImportance` normalises each module's vector by its L2 norm,
sums them per parent (attention heads, MLP channels) and keeps the moving average
``I ← λ·I + (1 - λ)·I_step`` (no bias correction; a step with a NaN anywhere is skipped).
"""

from __future__ import annotations

import torch
from torch import nn

from compress.errors import CompressError

# role -> (axis of the unit: "rows" of the weight or input "cols", unit kind)
ROLES = {
    "q_proj": ("rows", "heads"),
    "k_proj": ("rows", "kv_heads"),
    "v_proj": ("rows", "kv_heads"),
    "o_proj": ("cols", "heads"),
    "gate_proj": ("rows", "channels"),
    "up_proj": ("rows", "channels"),
    "down_proj": ("cols", "channels"),
}


def layer_linears(adapter, layer_index: int) -> dict[str, nn.Module]:
    """The seven linears of a layer by role (peft LoRA wrappers when adapters are attached)."""
    return {**adapter.attention_linears(layer_index), **adapter.mlp_linears(layer_index)}


def group_sum(values: torch.Tensor, role: str, head_dim: int) -> torch.Tensor:
    """[units] sums of per-row (or per-column) values over each unit (a head's head_dim rows)."""
    if ROLES[role][1] == "channels":
        return values
    return values.reshape(-1, head_dim).sum(dim=1)


# ------------------------------------------------------------------------------------ LoRA metric
def _lora_parts(layer: nn.Module, adapter_name: str = "default"):
    if getattr(layer, "fan_in_fan_out", False):
        raise CompressError("fan_in_fan_out LoRA layers are not supported by the lora importance")
    if getattr(layer, "use_dora", {}).get(adapter_name, False):
        raise CompressError("DoRA adapters are not supported by the lora importance (use importance: exact)")
    return layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight, float(layer.scaling[adapter_name])


@torch.no_grad()
def lora_element_importance(layer: nn.Module) -> torch.Tensor | None:
    """``|G_BA ⊙ (W + s·B·A)|`` [out, in] (float32) of one peft LoRA linear; None before any gradient."""
    a, b, scaling = _lora_parts(layer)
    if a.grad is None or b.grad is None:
        return None
    a, b, da, db = a.float(), b.float(), a.grad.float(), b.grad.float()
    estimate = db @ a + b @ da - db @ da
    weight = layer.get_base_layer().weight.float() + scaling * (b @ a)
    return (estimate * weight).abs()


class LoraGradientScorer:
    """Unit scores from the adapters' gradients (call after backward, before ``optimizer.step``)."""

    name = "lora"

    def attach(self, adapter) -> None:
        self.adapter = adapter

    def detach(self) -> None:
        pass

    def collect(self) -> list[dict[str, torch.Tensor]]:
        from peft.tuners.lora import LoraLayer

        d = self.adapter.head_dim
        per_layer = []
        for i in range(self.adapter.num_layers):
            scores = {}
            for role, linear in layer_linears(self.adapter, i).items():
                if not isinstance(linear, LoraLayer):
                    continue
                element = lora_element_importance(linear)
                if element is None:
                    continue
                axis = 1 if ROLES[role][0] == "rows" else 0
                scores[role] = group_sum(element.sum(dim=axis, dtype=torch.float64), role, d)
            per_layer.append(scores)
        return per_layer


# ------------------------------------------------------------------------------------ exact Taylor
class TaylorScorer:
    """Group Taylor scores from activation hooks, summed over every micro-batch of a step.

    Rows: a forward hook keeps each linear's output ``y`` and a tensor hook adds ``Σ_t y·dL/dy``
    when its gradient arrives. Columns (o/down): a forward pre-hook does the same with the input
    ``x`` (after any input mask registered before it).
    """

    name = "exact"

    def __init__(self):
        self.handles: list = []
        self.sums: list[dict[str, torch.Tensor]] = []

    def attach(self, adapter) -> None:
        self.adapter = adapter
        self.sums = [{} for _ in range(adapter.num_layers)]
        for i in range(adapter.num_layers):
            for role, linear in layer_linears(adapter, i).items():
                if ROLES[role][0] == "rows":
                    self.handles.append(linear.register_forward_hook(self._row_hook(i, role)))
                else:
                    self.handles.append(linear.register_forward_pre_hook(self._column_hook(i, role)))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _add(self, layer: int, role: str, tensor: torch.Tensor, grad: torch.Tensor) -> None:
        contribution = (tensor.detach().float() * grad.float()).reshape(-1, tensor.shape[-1]).sum(0, dtype=torch.float64)
        sums = self.sums[layer]
        sums[role] = contribution if role not in sums else sums[role] + contribution

    def _watch(self, layer: int, role: str, tensor: torch.Tensor) -> None:
        if torch.is_grad_enabled() and tensor.requires_grad:
            # The hook keeps a detached view: holding ``tensor`` itself would make a reference cycle
            # (tensor → its hooks → this closure → tensor) that frees each step's activations only
            # when the cyclic garbage collector runs.
            value = tensor.detach()
            tensor.register_hook(lambda grad: self._add(layer, role, value, grad))

    def _row_hook(self, layer: int, role: str):
        def hook(module, args, output):
            self._watch(layer, role, output)
        return hook

    def _column_hook(self, layer: int, role: str):
        def hook(module, args):
            self._watch(layer, role, args[0])
        return hook

    def collect(self) -> list[dict[str, torch.Tensor]]:
        d = self.adapter.head_dim
        per_layer = [{role: group_sum(v, role, d).abs() for role, v in sums.items()} for sums in self.sums]
        self.sums = [{} for _ in range(self.adapter.num_layers)]
        return per_layer


SCORERS = {"lora": LoraGradientScorer, "exact": TaylorScorer}


# ------------------------------------------------------------------------------------ moving average
def _normalised(vector: torch.Tensor) -> torch.Tensor:
    return vector / (vector.norm() + 1e-8)


class UnitImportance:
    """Moving average of per-layer unit scores: ``heads[i]`` [heads], ``channels[i]`` [intermediate].

    A head's score is ``q + o + (k + v)[its KV head] / g`` of the L2-normalised module vectors (g
    query heads per KV head, so a KV group's summed score counts k and v once); a channel's is
    ``gate + up + down``.
    """

    def __init__(self, adapter, decay: float = 0.9):
        self.decay = decay
        self.kv_of_head = [adapter.kv_head_of_query_heads(i) for i in range(adapter.num_layers)]
        widths = adapter.all_widths()
        self.heads_per_kv = [w.heads_per_kv for w in widths]
        self.heads = [torch.zeros(w.heads, dtype=torch.float64) for w in widths]
        self.channels = [torch.zeros(w.intermediate, dtype=torch.float64) for w in widths]
        self.updates = 0
        self.skipped = 0

    def step_scores(self, module_scores: list[dict[str, torch.Tensor]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """This step's parent sums (before averaging)."""
        heads, channels = [], []
        for i, scores in enumerate(module_scores):
            h = torch.zeros_like(self.heads[i])
            c = torch.zeros_like(self.channels[i])
            g = self.heads_per_kv[i]
            for role, vector in scores.items():
                vector = _normalised(vector.detach().to("cpu", torch.float64))
                kind = ROLES[role][1]
                if kind == "heads":
                    h += vector
                elif kind == "kv_heads":
                    h += vector[self.kv_of_head[i]] / g
                else:
                    c += vector
            heads.append(h)
            channels.append(c)
        return heads, channels

    def update(self, module_scores: list[dict[str, torch.Tensor]]) -> bool:
        """Fold one step's scores into the average; False (and nothing changes) if any is NaN."""
        heads, channels = self.step_scores(module_scores)
        if any(torch.isnan(t).any() for t in heads + channels):
            self.skipped += 1
            return False
        for i in range(len(heads)):
            self.heads[i].mul_(self.decay).add_(heads[i], alpha=1.0 - self.decay)
            self.channels[i].mul_(self.decay).add_(channels[i], alpha=1.0 - self.decay)
        self.updates += 1
        return True

    def flat(self) -> torch.Tensor:
        return torch.cat(self.heads + self.channels)

    def state_dict(self) -> dict:
        return {"heads": [t.clone() for t in self.heads], "channels": [t.clone() for t in self.channels],
                "updates": self.updates, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.heads = [t.clone().to(torch.float64) for t in state["heads"]]
        self.channels = [t.clone().to(torch.float64) for t in state["channels"]]
        self.updates, self.skipped = int(state["updates"]), int(state["skipped"])
