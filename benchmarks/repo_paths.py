"""Paths as the benchmarks write them into JSON: relative to the repository, never this machine's."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def command_line(script: str) -> str:
    """This run's command (``script``: the benchmark's ``__file__``), with paths inside the
    repository made relative to it."""
    words = []
    for word in sys.argv[1:]:
        path = Path(word)
        if path.is_absolute() and path.resolve().is_relative_to(ROOT):
            word = str(path.resolve().relative_to(ROOT))
        words.append(word)
    return shlex.join(["python", str(Path(script).resolve().relative_to(ROOT)), *words])


def display(path: Path) -> str:
    """``path`` relative to the repository when it is inside it."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
