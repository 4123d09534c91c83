"""Calibration and evaluation text: sources, tokenisation, windows."""

from __future__ import annotations

from compress.calibration.sources import (
    AUSTEN_NOVELS,
    CALIBRATION_NOVELS,
    austen_novel,
    random_windows,
    read_text,
    sequential_windows,
    tokenize_text,
)

__all__ = [
    "AUSTEN_NOVELS",
    "CALIBRATION_NOVELS",
    "austen_novel",
    "random_windows",
    "read_text",
    "sequential_windows",
    "tokenize_text",
]
