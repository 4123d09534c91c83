"""Gates on encoder attention heads and FFN channels, without transformers' removed ``head_mask``.

Michel et al. write multi-head attention as ``MHA(x) = Σ_h ξ_h · W_O,h · E_h(x)``. Since ``W_O`` is
linear, scaling head h's slice of the output projection's input by ξ_h is the same thing, so a
forward pre-hook on the o linear (BERT: ``attention.output.dense``; ViT/CLIP: ``o_proj`` /
``out_proj``) reshapes its input ``[..., H·D] → [..., H, D]``, multiplies by ``ξ[:, None]`` and
reshapes back. The o bias is untouched: a layer whose gates are all 0 computes exactly what the
surgeon's "no heads" layer computes (the bias alone).

The same gates serve three purposes:

* masked evaluation: ``gates.set_mask(layer, keep_heads)`` gives the same outputs as slicing
  those heads with `compress.pruning.encoder_surgeon` (up to float rounding);
* Michel scores: with ``requires_grad=True`` the gates are leaves and ``dL/dξ`` lands in
  ``gate.grad`` (see `compress.pruning.head_scores.TaylorGateScore`);
* parity tests (gated == sliced == exported).

`ChannelGates` does the same for FFN channels with a pre-hook on the down projection (its input
is the activated channels, ``[..., intermediate]``).

Usage::

    with HeadGates(adapter) as gates:
        gates.set_mask(3, [0, 2, 5])
        out = adapter.model(**batch)

Hooks registered *after* the gates (e.g. a scorer's recording hook on the same o linear) see the
gated input; forward pre-hooks run in registration order. Widths are read when the gates attach:
create gates after any slicing, not before. Gates are float32 ones by default (exactly 1, so an
untouched gate changes nothing) and live on each layer's device.
"""

from __future__ import annotations

import torch
from torch import nn

from compress.errors import CompressError


class _InputGates:
    """One gate vector per layer, multiplied into the input of one linear per layer (by groups of
    ``group`` consecutive input features)."""

    kind = "unit"

    def __init__(self, adapter, requires_grad: bool = False, dtype: torch.dtype = torch.float32):
        self.adapter = adapter
        self.requires_grad = requires_grad
        self.dtype = dtype
        self.gates: list[torch.Tensor] = []
        self.last_token_count = 0
        self._handles: list = []

    # ------------------------------------------------------------------------ per subclass
    def _width(self, layer_index: int) -> int:
        raise NotImplementedError

    def _module(self, layer_index: int) -> nn.Module:
        raise NotImplementedError

    def _group(self) -> int:
        raise NotImplementedError

    # --------------------------------------------------------------------------- lifecycle
    def attach(self) -> "_InputGates":
        if self._handles:
            raise CompressError(f"{type(self).__name__} is already attached")
        self.gates = []
        for i in range(self.adapter.num_layers):
            width = self._width(i)
            if width == 0:
                self.gates.append(torch.zeros(0, dtype=self.dtype))
                continue
            module = self._module(i)
            device = next(module.parameters()).device
            gate = torch.ones(width, dtype=self.dtype, device=device, requires_grad=self.requires_grad)
            self.gates.append(gate)
            self._handles.append(module.register_forward_pre_hook(self._hook(i)))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self):
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def _hook(self, layer_index: int):
        # The closure holds the gates object and an index, never an activation tensor.
        def hook(module, args):
            return (self._apply(layer_index, args[0]),) + tuple(args[1:])
        return hook

    def _apply(self, layer_index: int, x: torch.Tensor) -> torch.Tensor:
        gate = self.gates[layer_index]
        group = self._group()
        if x.shape[-1] != gate.shape[0] * group:
            raise CompressError(f"layer {layer_index}: {self.kind} gates expect an input of "
                                f"{gate.shape[0]}·{group} features, got {x.shape[-1]} (re-create the gates after slicing)")
        self.last_token_count = x.shape[:-1].numel()
        g = gate.to(x.dtype)
        if group == 1:
            return x * g
        shape = x.shape
        return (x.unflatten(-1, (gate.shape[0], group)) * g[:, None]).reshape(shape)

    # -------------------------------------------------------------------------------- values
    def gate(self, layer_index: int) -> torch.Tensor:
        """The gate vector of a layer (the tensor itself: a leaf when ``requires_grad``)."""
        return self.gates[layer_index]

    @torch.no_grad()
    def set(self, layer_index: int, values) -> None:
        """Overwrite the gate vector of a layer with ``values`` (same length)."""
        gate = self.gates[layer_index]
        values = torch.as_tensor(values, dtype=gate.dtype, device=gate.device)
        if values.shape != gate.shape:
            raise CompressError(f"layer {layer_index}: {self.kind} gate values of shape {tuple(values.shape)}, "
                                f"expected {tuple(gate.shape)}")
        gate.copy_(values)

    @torch.no_grad()
    def set_mask(self, layer_index: int, keep) -> None:
        """Gate 1 on the units ``keep`` of layer ``layer_index``, 0 elsewhere."""
        gate = self.gates[layer_index]
        keep = [int(k) for k in keep]
        if any(not 0 <= k < gate.shape[0] for k in keep):
            raise CompressError(f"layer {layer_index}: {self.kind} indices {keep} out of range 0..{gate.shape[0] - 1}")
        gate.zero_()
        if keep:
            gate[torch.tensor(keep, dtype=torch.long, device=gate.device)] = 1

    def set_masks(self, keep_by_layer: dict[int, list[int]]) -> None:
        """`set_mask` for every layer in ``keep_by_layer``; other layers are left as they are."""
        for layer_index, keep in keep_by_layer.items():
            self.set_mask(int(layer_index), keep)

    @torch.no_grad()
    def reset(self) -> None:
        """Every gate back to 1 (gradients are left alone; see `zero_grad`)."""
        for gate in self.gates:
            gate.fill_(1)

    def zero_grad(self) -> None:
        for gate in self.gates:
            gate.grad = None

    def grads(self) -> list[torch.Tensor]:
        """Per layer ``dL/dξ`` accumulated since the last `zero_grad`, float64 on the CPU (zeros before
        any backward; an empty tensor for a layer without the part)."""
        return [torch.zeros(g.shape[0], dtype=torch.float64) if g.grad is None
                else g.grad.detach().to("cpu", torch.float64).clone() for g in self.gates]

    def parameters(self) -> list[torch.Tensor]:
        """The non-empty gate vectors (for an optimiser, e.g. learned gates)."""
        return [g for g in self.gates if g.numel()]


class HeadGates(_InputGates):
    """ξ_l [heads_l] per layer that still has attention (an empty tensor otherwise), applied by a
    forward pre-hook on the layer's o linear."""

    kind = "head"

    def _width(self, layer_index: int) -> int:
        return self.adapter.widths(layer_index).heads

    def _module(self, layer_index: int) -> nn.Module:
        return self.adapter.attention_consumer(layer_index)

    def _group(self) -> int:
        return self.adapter.head_dim


class ChannelGates(_InputGates):
    """One gate per FFN channel [intermediate_l], applied by a forward pre-hook on the layer's down
    projection."""

    kind = "channel"

    def _width(self, layer_index: int) -> int:
        return self.adapter.widths(layer_index).intermediate

    def _module(self, layer_index: int) -> nn.Module:
        return self.adapter.ffn_consumer(layer_index)

    def _group(self) -> int:
        return 1
