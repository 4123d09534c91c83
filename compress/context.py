"""What a pass sees while it runs: the model, its adapter, and the calibration data (lazily)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass
class PassContext:
    """Shared state handed to each pass.

    Args:
        model: the HF causal LM being compressed (modified in place by pruning passes).
        tokenizer: its tokenizer.
        calibration_loader: returns the calibration windows [n, seqlen] (called at most once).
        batches_loader: encoders: returns the calibration batches, a list of model-input dicts
            (text: input_ids / attention_mask / token_type_ids; images: pixel_values).
        batch_size: calibration windows per block forward.
        progress: show progress bars.
        dense_loader: returns the dense (unpruned) model, e.g. as a distillation teacher; called
            at most once, the model is kept.
        heldout_loader: returns held-out windows of the calibration source [m, seqlen] (another
            seed, never the calibration windows themselves), for choices made on data the
            statistics did not see.
        blocks: where a structured pass finds the model's blocks (compress.pruning.blocks); None:
            in memory. Out of core, the streamed blocks of the checkpoint.
    """

    model: Any
    tokenizer: Any = None
    calibration_loader: Callable[[], torch.Tensor] | None = None
    batch_size: int = 16
    progress: bool = True
    batches_loader: Callable[[], list[dict]] | None = None
    dense_loader: Callable[[], Any] | None = None
    heldout_loader: Callable[[], torch.Tensor] | None = None
    blocks: Any = None
    _calibration: torch.Tensor | None = field(default=None, repr=False)
    _dense: Any = field(default=None, repr=False)
    _heldout: torch.Tensor | None = field(default=None, repr=False)
    _batches: list[dict] | None = field(default=None, repr=False)

    def adapter(self):
        from compress.models.adapters import get_adapter

        return get_adapter(self.model)

    def calibration_ids(self) -> torch.Tensor:
        """[n, seqlen] calibration windows (drawn once, then reused by later passes)."""
        if self._calibration is None:
            if self.calibration_loader is None:
                from compress.errors import CompressError

                raise CompressError("this pass needs calibration data; add a `calibration:` section to the recipe")
            self._calibration = self.calibration_loader()
        return self._calibration

    def heldout_ids(self) -> torch.Tensor:
        """[m, seqlen] held-out calibration windows (drawn once)."""
        if self._heldout is None:
            if self.heldout_loader is None:
                from compress.errors import CompressError

                raise CompressError("this pass needs held-out calibration windows; add a `calibration:` section")
            self._heldout = self.heldout_loader()
        return self._heldout

    def dense_model(self):
        """The dense model (eval mode, no gradients), loaded once."""
        if self._dense is None:
            if self.dense_loader is None:
                from compress.errors import CompressError

                raise CompressError("this pass needs the dense model (e.g. as a teacher), which this run cannot load")
            self._dense = self.dense_loader().eval().requires_grad_(False)
        return self._dense

    def release_dense(self) -> None:
        """Drop the dense model (the next :meth:`dense_model` loads it again)."""
        self._dense = None

    def calibration_batches(self) -> list[dict]:
        """Encoders: the calibration batches (model-input dicts), drawn once, then reused."""
        if self._batches is None:
            if self.batches_loader is None:
                from compress.errors import CompressError

                raise CompressError("this pass needs calibration data; add a `calibration:` section to the recipe")
            self._batches = self.batches_loader()
        return self._batches
