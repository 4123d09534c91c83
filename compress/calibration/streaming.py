"""Calibration runner for a model whose blocks are materialised one at a time (out of core).

``StreamingRunner`` has ``LayerRunner``'s interface (``adapter``, ``capture_inputs``,
``run_block``, ``blocks``), so the pruner's ``observe_block`` drives it unchanged. Two
differences: block 0's inputs are built from embedding rows read from the checkpoint (the
embedding matrix is never loaded whole), and the per-batch hidden states live in an activation
store, in RAM or on disk.

Stores hold one tensor per calibration batch, [b, seqlen, hidden]:

    MemoryActivations()           a list in RAM (on the run's device)
    DiskActivations(folder)       one safetensors file per batch in ``folder`` (written to a
                                  temporary name and renamed, so a batch file is never torn)
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import torch

from compress.calibration.runner import capture_block_inputs


class MemoryActivations:
    """Per-batch hidden states [b, seqlen, hidden] held in memory."""

    on_disk = False

    def __init__(self):
        self.items: list[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self.items)

    def append(self, hidden: torch.Tensor) -> None:
        self.items.append(hidden)

    def get(self, batch: int) -> torch.Tensor:
        return self.items[batch]

    def put(self, batch: int, hidden: torch.Tensor) -> None:
        self.items[batch] = hidden

    def close(self) -> None:
        self.items.clear()


class DiskActivations:
    """Per-batch hidden states [b, seqlen, hidden] as ``batch-NNNNN.safetensors`` files in
    ``folder`` (created; removed by ``close``). ``get`` returns the batch on ``device``."""

    on_disk = True
    KEY = "hidden"

    def __init__(self, folder: Path, device: torch.device | str = "cpu"):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.device = torch.device(device)
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def _path(self, batch: int) -> Path:
        return self.folder / f"batch-{batch:05d}.safetensors"

    def append(self, hidden: torch.Tensor) -> None:
        self.count += 1
        self.put(self.count - 1, hidden)

    def get(self, batch: int) -> torch.Tensor:
        from safetensors.torch import load_file

        return load_file(self._path(batch))[self.KEY].to(self.device)

    def put(self, batch: int, hidden: torch.Tensor) -> None:
        from safetensors.torch import save_file

        target = self._path(batch)
        partial = target.with_name(target.name + ".partial")
        save_file({self.KEY: hidden.detach().to("cpu").contiguous()}, str(partial))
        os.replace(partial, target)

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        self.count = 0


class StreamingRunner:
    """Runs calibration batches block by block over blocks that are loaded on demand.

    Args:
        adapter: the adapter of the (meta-device) model; block ``i`` must be materialised at
            ``adapter.layers[i]`` when ``run_block(i)`` is called.
        input_ids: [n, seqlen] calibration windows.
        embed: ``embed(ids [u]) -> [u, hidden]``: embedding rows, read from the checkpoint.
        store: where the hidden states live (``MemoryActivations`` or ``DiskActivations``).
        batch_size: windows per block forward.
        device: where the embedding rows go (the blocks' device).
    """

    def __init__(self, adapter, input_ids: torch.Tensor, embed: Callable[[torch.Tensor], torch.Tensor], store,
                 batch_size: int = 16, device: torch.device | str = "cpu"):
        self.adapter = adapter
        self.input_ids = input_ids
        self.embed = embed
        self.store = store
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.block_kwargs: list = []  # per batch: BlockKwargs
        self.in_heldout = False  # as LayerRunner's: out of core runs no held-out windows

    @torch.no_grad()
    def capture_inputs(self) -> None:
        """Block 0's inputs for every batch: the embedding rows of the calibration tokens (each
        distinct token read once) through the decoder's preamble (positions, mask, rotary)."""
        unique, inverse = torch.unique(self.input_ids, return_inverse=True)
        rows = self.embed(unique).to(self.device)  # [u, hidden]
        batches = ({"inputs_embeds": rows[batch]} for batch in inverse.split(self.batch_size))
        for hidden, kwargs in capture_block_inputs(self.adapter, batches):
            self.store.append(hidden)
            self.block_kwargs.append(kwargs)
        del rows

    @torch.no_grad()
    def run_block(self, layer_index: int, update: bool = True) -> None:
        """Run block ``layer_index`` on every batch; with ``update`` its outputs replace the inputs."""
        if not self.block_kwargs:
            self.capture_inputs()
        block = self.adapter.layers[layer_index]
        for b, kwargs in enumerate(self.block_kwargs):
            out = block(self.store.get(b), **kwargs.layer(layer_index))
            out = out[0] if isinstance(out, tuple) else out
            if update:
                self.store.put(b, out)

    def close(self) -> None:
        """Drop the activations (a disk store removes its folder)."""
        self.store.close()
        self.block_kwargs.clear()
