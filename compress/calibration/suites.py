"""Named evaluation suites: lists of text sources measured together (no heavy imports here, so the
recipe schema can check a suite name cheaply).

``v2`` is the standard protocol v2: Austen's Persuasion (continuity with protocol v1) and the test
split of every domain of the embedded general corpus, the held-out domain (``chat``, typed
conversations, absent from the calibration mix) included.
"""

from __future__ import annotations

EVALUATION_SUITES: dict[str, list[str]] = {
    "v2": [
        "austen:persuasion",
        "general:brown",
        "general:sotu",
        "general:wiki",
        "general:pydocs",
        "general:pycode",
        "general:chat",
    ],
}
DEFAULT_SUITE = "v2"

# Text sources made of parts (the general corpus' calibration mix): a training pass can draw their
# parts separately (compress.calibration.sources.mix_part_texts).
MIXED_SOURCES = ("general", "general:train")


def dataset_name(source: str) -> str:
    """The short name a text source goes by in reports: ``austen:persuasion`` -> ``persuasion``,
    ``general:wiki`` -> ``wiki``, ``general:wiki:train`` -> ``wiki:train``, a file -> its stem."""
    from pathlib import Path

    for prefix in ("austen:", "general:"):
        if source.startswith(prefix):
            return source[len(prefix):]
    return source if ":" not in source and "/" not in source and "." not in source else Path(source).stem
