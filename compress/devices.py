"""The one device resolver: a device name from a recipe or the command line -> the device to run on.

Names: ``auto`` (a CUDA GPU when one is visible, else the CPU), ``cpu``, ``cuda``, ``cuda:N``.
Anything else, or CUDA without a GPU, is a :class:`~compress.errors.CompressError` that names the
device; torch is imported only when a name needs it.
"""

from __future__ import annotations

import re

from compress.errors import CompressError

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_device_name(value: str) -> str:
    """``value`` stripped, if it is a device name a recipe may use; ValueError otherwise."""
    text = str(value).strip()
    if not DEVICE_PATTERN.match(text):
        shown = f"'{value}'" if isinstance(value, str) else repr(value)
        raise ValueError(f"must be auto, cpu, cuda or cuda:N (got {shown})")
    return text


def resolve_device(name: str | None = "auto") -> str:
    """``auto``/None -> ``cuda`` when a GPU is visible, else ``cpu``; ``cuda[:N]`` only when a GPU is
    visible (CompressError otherwise); ``cpu`` as is."""
    try:
        name = check_device_name(name or "auto")
    except ValueError as error:
        raise CompressError(f"device {error}") from None
    if name == "cpu":
        return name
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available():
        raise CompressError(f"device '{name}' asked for, but no CUDA GPU is available; use 'cpu' or 'auto'")
    return name
