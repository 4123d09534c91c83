"""ONNX graphs as prunable models: the coupled-channel groups of any graph, found by propagating
channel dependencies op by op (``grouping.find_groups``), and the surgery that cuts them
(``surgery.prune_onnx``). This is the ONNX kind's model layer; passes (spa) choose what to cut.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from compress.models.onnx_graph.grouping import WEIGHT_TYPES, find_groups, load_onnx


@dataclass
class OnnxPassContext:
    """What a pass on an ONNX model sees: the model (weights loaded) and where it came from."""

    model: object  # onnx.ModelProto, replaced by each pass
    source: Path
    progress: bool = True
    shapes_before: dict[str, tuple[int, ...]] = field(default_factory=dict)


def load_graph(path: Path, weights: bool = True):
    """The ONNX model at ``path`` (with its external weights unless ``weights`` is false)."""
    return load_onnx(path, weights=weights)


__all__ = ["OnnxPassContext", "WEIGHT_TYPES", "find_groups", "load_graph", "load_onnx"]
