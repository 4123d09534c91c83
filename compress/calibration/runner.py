"""Layer-by-layer calibration runner.

The calibration batch goes through the model one decoder block at a time: the inputs of block 0
are captured once, then each block is run on every batch and its outputs become the next block's
inputs. Statistics are gathered with forward hooks while a block runs. Memory is one block's
activations for the whole calibration set ([n, seqlen, hidden]) plus the block itself.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from compress.progress import progress_bar


class _StopForward(Exception):
    """Raised by the last block's recorder once every block's inputs are recorded."""


class LayerRunner:
    """Runs calibration batches block by block.

    Args:
        adapter: the model's adapter (gives ``decoder`` and ``layers``).
        input_ids: [n, seqlen] calibration windows.
        batch_size: windows per block forward.
        progress: show a progress bar over blocks.
        heldout_ids: [m, seqlen'] held-out windows run after the calibration batches; while one of
            their batches runs, ``in_heldout`` is True (hooks use it to keep their statistics apart).
    """

    def __init__(self, adapter, input_ids: torch.Tensor, batch_size: int = 16, progress: bool = True,
                 heldout_ids: torch.Tensor | None = None):
        self.adapter = adapter
        self.batch_size = batch_size
        self.progress = progress
        device = next(adapter.model.parameters()).device
        self.input_ids = input_ids.to(device)
        self.heldout_ids = heldout_ids.to(device) if heldout_ids is not None else None
        self.hidden: list[torch.Tensor] = []  # per batch: [b, seqlen, hidden] inputs of the current block
        self.block_kwargs: list[BlockKwargs] = []  # per batch: the keyword arguments the decoder passes its blocks
        self.calibration_batches = 0  # batches before this index are calibration, the rest held out
        self.in_heldout = False
        self.next_layer = 0
        self.dense_hidden: list[torch.Tensor] | None = None  # track_dense: the dense model's stream, per batch

    @torch.no_grad()
    def capture_inputs(self) -> None:
        """Record block 0's inputs for every batch by running the decoder up to block 0."""
        batches = [{"input_ids": batch} for batch in self.input_ids.split(self.batch_size)]
        self.calibration_batches = len(batches)
        if self.heldout_ids is not None:
            batches += [{"input_ids": batch} for batch in self.heldout_ids.split(self.batch_size)]
        for hidden, kwargs in capture_block_inputs(self.adapter, batches):
            self.hidden.append(hidden)
            self.block_kwargs.append(kwargs)
        self.next_layer = 0

    @torch.no_grad()
    def run_block(self, layer_index: int, update: bool = True,
                  on_output: Callable[[int, torch.Tensor], None] | None = None) -> None:
        """Run block ``layer_index`` on every batch; with ``update`` its outputs replace the inputs;
        ``on_output(b, out)`` sees batch ``b``'s output [b, seqlen, hidden] (hooks have run by then)."""
        if not self.hidden:
            self.capture_inputs()
        block = self.adapter.layers[layer_index]
        for b, (hidden, kwargs) in enumerate(zip(self.hidden, self.block_kwargs)):
            self.in_heldout = b >= self.calibration_batches
            out = block(hidden, **kwargs.layer(layer_index))
            out = out[0] if isinstance(out, tuple) else out
            if on_output is not None:
                on_output(b, out)
            if update:
                self.hidden[b] = out
        self.in_heldout = False
        if update:
            self.next_layer = layer_index + 1

    def track_dense(self) -> None:
        """Keep a second stream beside the one the blocks update: the dense model's own hidden states
        (block 0's inputs now), advanced by :meth:`run_dense_block` while each block is still dense."""
        if not self.hidden:
            self.capture_inputs()
        self.dense_hidden = list(self.hidden)

    @torch.no_grad()
    def run_dense_block(self, layer_index: int) -> None:
        """Advance the dense stream through block ``layer_index``, which must not be pruned yet:
        ``dense_hidden`` then holds the dense model's outputs of that block."""
        if self.dense_hidden is None:
            raise RuntimeError("run_dense_block needs track_dense() first")
        block = self.adapter.layers[layer_index]
        for b, (hidden, kwargs) in enumerate(zip(self.dense_hidden, self.block_kwargs)):
            out = block(hidden, **kwargs.layer(layer_index))
            self.dense_hidden[b] = out[0] if isinstance(out, tuple) else out

    def blocks(self, description: str = "calibrating") -> Iterator[int]:
        """Layer indices in order, with a progress bar."""
        yield from progress_bar(range(self.adapter.num_layers), description, enabled=self.progress)

    def close(self) -> None:
        """Drop the held activations."""
        self.hidden.clear()
        self.block_kwargs.clear()
        self.dense_hidden = None


class BlockKwargs:
    """The keyword arguments the decoder passes each of its blocks for one batch (mask, position
    embeddings, ...). Most families pass every block the same ones; Gemma 2/3 (and sliding-window
    layers generally) pass a layer-type-specific mask and rotary table, so they are kept per block
    (references to the same few tensors, not copies)."""

    def __init__(self, per_block: list[dict]):
        self.per_block = per_block

    def layer(self, index: int) -> dict:
        """The keyword arguments of block ``index``."""
        return self.per_block[index]


class _BlockRecorder(nn.Module):
    """Stands in for block ``index`` while the inputs are captured: records what the decoder passes
    it and returns the hidden state unchanged; the last one stops the forward (so the final norm
    and head never run, and real blocks, possibly unmaterialised, are never called)."""

    def __init__(self, index: int, last: bool, sink: dict):
        super().__init__()
        self.index, self.last, self.sink = index, last, sink

    def forward(self, hidden_states, *args, **kwargs):
        if self.index == 0:
            self.sink["hidden"] = hidden_states
        kwargs = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values")}
        kwargs["use_cache"] = False
        self.sink["kwargs"].append(kwargs)
        if self.last:
            raise _StopForward
        return hidden_states


@torch.no_grad()
def capture_block_inputs(adapter, decoder_inputs: Iterable[dict]) -> Iterator[tuple[torch.Tensor, BlockKwargs]]:
    """For each mapping of decoder inputs (``input_ids`` [b, seqlen] or ``inputs_embeds``
    [b, seqlen, hidden]), run the decoder's preamble and yield what its blocks receive: block 0's
    hidden state [b, seqlen, hidden] and every block's keyword arguments (:class:`BlockKwargs`),
    with the cache turned off. The blocks are swapped for recorders meanwhile and never run, so
    they may be unmaterialised (meta)."""
    layers = adapter.layers
    originals = list(layers)
    sink: dict = {}
    for i in range(len(originals)):
        layers[i] = _BlockRecorder(i, i == len(originals) - 1, sink)
    try:
        for inputs in decoder_inputs:
            sink.update(hidden=None, kwargs=[])
            try:
                adapter.decoder(**inputs, use_cache=False)
            except _StopForward:
                pass
            yield sink["hidden"], BlockKwargs(list(sink["kwargs"]))
    finally:
        for i, block in enumerate(originals):
            layers[i] = block


@contextmanager
def input_hooks(modules: dict[str, nn.Module], callback: Callable[[str, torch.Tensor], None]):
    """Call ``callback(name, input)`` with each module's first positional input while active."""
    handles = []
    for name, module in modules.items():

        def hook(_module, args, _name=name):
            callback(_name, args[0])

        handles.append(module.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
