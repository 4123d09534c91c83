"""The values of single recipe fields: defaults and allowed names (models, dtypes, export
formats, text sources), and the validators of one value (run name, device, text source, export
format) that the schema attaches to its fields."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator

from compress.calibration.suites import MIXED_SOURCES
from compress.devices import check_device_name
from compress.recipe.problems import show_value

DATA_DIR = Path(__file__).resolve().parent.parent / "data"  # compress/data: the texts shipped with the package

DEFAULT_MODEL = "smollm2-135m"
DType = Literal["float32", "float16", "bfloat16"]
EXPORT_FORMATS_AVAILABLE = ("safetensors", "onnx", "gguf")
EXPORT_FORMATS_PLANNED: tuple[str, ...] = ()
DEFAULT_GENERATION_PROMPTS = (  # one per kind of text of the evaluation suite
    "It was a truth universally acknowledged that",
    "Photosynthesis is the process by which",
    "In his address to Congress, the President said that",
    "def read_config(path):\n",
    "A: Hi! How was your weekend?\nB:",
)
AUSTEN_PREFIX = "austen"
IMAGE_SOURCES = ("textile",)  # labelled images for vision encoders (compress.calibration.images)


def austen_text_names() -> tuple[str, ...]:
    """Names accepted after ``austen:``: ``calibration`` and every novel shipped in ``compress/data``."""
    novels = sorted(p.name.split(".")[0] for p in DATA_DIR.glob("*.txt*"))
    return ("calibration", *novels)


_NOT_IN_RUN_NAME = re.compile(r"[/\\\x00-\x1f\x7f]")


def check_run_name(value: str) -> str:
    """A run name names one folder (``outputs/<name>``): no path separator or control character,
    not starting with a dot (so not ``.`` or ``..``), not blank, at most 200 characters; raise
    ValueError otherwise."""
    if _NOT_IN_RUN_NAME.search(value) or value.startswith(".") or not value.strip() or len(value) > 200:
        raise ValueError(f"must be a plain name for the folder outputs/<name>: no / or \\, no control characters, "
                         f"not starting with a dot, at most 200 characters; got {show_value(value)}")
    return value


def normalize_device(value: str) -> str:
    """Return ``value`` if it names a device a recipe may ask for; raise ValueError otherwise."""
    return check_device_name(value)


def general_text_names() -> tuple[str, ...]:
    """Text sources of the embedded general corpus (``compress/data/general/manifest.json``): its
    mixes (``MIXED_SOURCES``: ``general``, ``general:train``) and per domain ``general:<d>``,
    ``general:<d>:test`` and, for a domain in the calibration mix, ``general:<d>:train``."""
    manifest = DATA_DIR / "general" / "manifest.json"
    try:
        domains = json.loads(manifest.read_text(encoding="utf-8"))["domains"]
    except (OSError, ValueError, KeyError):
        return MIXED_SOURCES
    names = list(MIXED_SOURCES)
    for name, info in domains.items():
        names += [f"general:{name}", f"general:{name}:test"]
        if info.get("in_mix"):
            names.append(f"general:{name}:train")
    return tuple(names)


def check_text_source(value: str) -> str:
    """A text source is ``general``, ``general:<domain>[:train]``, ``austen``, ``austen:<name>`` or an
    existing .txt/.jsonl file or folder; vision encoders read the image source ``textile`` instead."""
    if value == AUSTEN_PREFIX or value in IMAGE_SOURCES:
        return value
    if value == "general" or value.startswith("general:"):
        allowed = general_text_names()
        if value not in allowed:
            domains = list(dict.fromkeys(n.split(":")[1] for n in allowed if n.count(":") == 2))
            with_train = [n.split(":")[1] for n in allowed if n.endswith(":train") and n.count(":") == 2]
            raise ValueError(
                f"unknown general-corpus source {show_value(value)}; allowed: general (the calibration mix), "
                f"general:<domain> (test split) with <domain> one of {', '.join(domains)}, or "
                f"general:<domain>:train with <domain> one of {', '.join(with_train)}"
            )
        return value
    if value.startswith(AUSTEN_PREFIX + ":"):
        name = value.split(":", 1)[1]
        allowed = austen_text_names()
        if name not in allowed:
            choices = ", ".join(f"austen:{n}" for n in allowed)
            raise ValueError(f"unknown Austen text {show_value(value)}; allowed: austen, {choices}")
        return value
    if not Path(value).exists():
        raise ValueError(
            f"no such file or folder {show_value(value)} (relative paths resolve against the current "
            "working directory); use general, general:<domain>, austen, austen:<novel>, or a .txt/.jsonl "
            "file or folder of them (vision encoders: textile)"
        )
    return value


def check_export_format(value: str) -> str:
    """Return ``value`` if it names an export format available now; raise ValueError otherwise."""
    if value in EXPORT_FORMATS_AVAILABLE:
        return value
    available = ", ".join(EXPORT_FORMATS_AVAILABLE)
    if value in EXPORT_FORMATS_PLANNED:
        raise ValueError(f"{value} export is not available yet; available now: {available}")
    raise ValueError(f"unknown export format {show_value(value)}; available: {available}")


TextSource = Annotated[str, AfterValidator(check_text_source)]
ExportFormat = Annotated[str, AfterValidator(check_export_format)]


def default_run_name(source_name: str) -> str:
    """The recipe file's stem, made a valid run name (no control characters or leading dots)."""
    stem = Path(source_name).stem if source_name and not source_name.startswith("<") else ""
    return _NOT_IN_RUN_NAME.sub("-", stem).lstrip(".")[:200].strip() or "recipe"
