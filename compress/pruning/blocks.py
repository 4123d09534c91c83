"""Where a structured sweep finds the model's blocks: the execution strategy of a pruning pass.

    InMemoryBlocks(ctx)   every block is in memory: visiting one costs nothing, nothing is written
    StreamedBlocks        (compress.outofcore) each block is read from the checkpoint for the visit
                          and freed after it; a pruned block is written out (the sink) first

``StructuredPruner`` runs one set of sweeps (data-free, layer by layer, global, sequential) over
either; the model kind chooses which, once (its pass context's ``blocks``; out of core when the
recipe sets ``max_memory``). A block source gives:

    check(settings)            refuse settings it cannot run (CompressError naming the option)
    sweep(adapter, text)       the layer indices in order, with a progress bar
    visit(sweep, i)            a context in which block i's weights are present
    emit(i)                    block i is final (pruned): write it out if the source streams
    runner(adapter, heldout)   a calibration runner over the blocks, block 0's inputs captured
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Iterator

from compress.calibration.runner import LayerRunner
from compress.progress import progress_bar


def layer_sweep(adapter, description: str, progress: bool) -> Iterator[int]:
    """The layer indices in order, with a progress bar: every block source's ``sweep``."""
    yield from progress_bar(range(adapter.num_layers), description, enabled=progress)


class InMemoryBlocks:
    """The whole model is in memory (``ctx.model``): the default block source."""

    def __init__(self, ctx):
        self.ctx = ctx

    def check(self, settings) -> None:
        """Everything runs in memory."""

    def sweep(self, adapter, description: str) -> Iterator[int]:
        return layer_sweep(adapter, description, self.ctx.progress)

    def visit(self, sweep: str, i: int):
        return nullcontext()

    def emit(self, i: int) -> None:
        """In memory the pruned block is already where it belongs."""

    def runner(self, adapter, heldout: bool) -> LayerRunner:
        """A LayerRunner on the calibration windows (and on the held-out windows when ``heldout``)."""
        ctx = self.ctx
        runner = LayerRunner(adapter, ctx.calibration_ids(), batch_size=ctx.batch_size, progress=ctx.progress,
                             heldout_ids=ctx.heldout_ids() if heldout else None)
        runner.capture_inputs()
        return runner
