"""Output folders: written in staging, marked as compress's own, and replaced only when it is safe.

The rule of a careful tool:

- everything is written into a staging folder ``.NAME.tmp-<pid>`` beside the output ``NAME`` and
  renamed into place at the end, so an interrupted or failed run leaves nothing under ``NAME``;
- a finished output carries the marker file ``.compress-output``; an existing ``NAME`` is replaced
  only when it carries that marker or is an empty folder, or with ``overwrite=True`` (``--overwrite``);
- a *file* at ``NAME`` (or a symbolic link) is never touched, whatever the options;
- ``/``, the home folder, the working directory and any folder above it are refused as outputs;
- a staging folder left by a killed run (its marker names a process that no longer runs) is found
  and removed by the next run into the same parent folder, and the user is told.

Every refusal is an :class:`~compress.errors.OutputError` (exit 2) that names the path and says
what to do, raised before any work is done.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from compress.errors import OutputError

OUTPUT_MARKER = ".compress-output"
STAGING_MARKER = ".compress-staging"
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)$")


def notice(message: str) -> None:
    """A one-line note on stderr (not an error: the run goes on)."""
    print(f"note: {message}", file=sys.stderr)


# ----------------------------------------------------------------------------------- checks
def forbidden_output_reason(path: Path) -> str | None:
    """Why ``path`` may never be an output folder (None if it may): the root, the home folder, the
    working directory or one of its ancestors."""
    resolved = Path(os.path.abspath(path))
    real = Path(os.path.realpath(path))
    cwd = Path(os.path.realpath(Path.cwd()))
    for candidate in {resolved, real}:
        if candidate == Path(candidate.anchor):
            return "it is the root of the file system"
        if candidate == Path(os.path.realpath(Path.home())) or candidate == Path.home():
            return "it is your home folder"
        if candidate == cwd:
            return "it is the current working directory"
        if candidate in cwd.parents:
            return "it holds the current working directory"
    return None


def is_compress_output(folder: Path) -> bool:
    """True when ``folder`` carries the marker a finished compress output gets."""
    return (Path(folder) / OUTPUT_MARKER).is_file()


def _describe_existing(path: Path) -> str:
    if path.is_symlink():
        return "is a symbolic link"
    if path.is_dir():
        return "is a folder that compress did not write (it has no .compress-output marker)"
    return "is a file"


def check_output_folder(final: Path, *, overwrite: bool = False, option: str = "--output",
                        can_overwrite: bool = True) -> str:
    """Raise OutputError when ``final`` may not be written; otherwise say what will happen
    (``new``, ``replace compress output``, ``replace empty folder``, ``overwrite``)."""
    final = Path(final)
    reason = forbidden_output_reason(final)
    if reason is not None:
        raise OutputError(f"output folder {final}: refused because {reason}; give a new folder with {option}")
    if not final.exists() and not final.is_symlink():
        _check_parent(final, option)
        return "new"
    if final.is_symlink() or not final.is_dir():
        raise OutputError(f"output {final} {_describe_existing(final)}; compress writes a folder and never "
                          f"replaces anything else: give another path with {option}")
    if is_compress_output(final):
        return "replace compress output"
    if not any(final.iterdir()):
        return "replace empty folder"
    if overwrite:
        return "overwrite"
    hint = ", or pass --overwrite to replace it" if can_overwrite else ""
    raise OutputError(f"output folder {final} already exists and compress did not write it (no "
                      f"{OUTPUT_MARKER} marker inside); it is left as it is. Give another folder with {option}{hint}")


def _check_parent(final: Path, option: str) -> None:
    """The nearest existing ancestor of ``final`` must be a folder we can write into."""
    ancestor = final.parent if str(final.parent) else Path(".")
    while not ancestor.exists():
        if ancestor.is_symlink():
            break
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"output folder {final}: {ancestor} is a file, so no folder can be made under it; "
                          f"give another path with {option}")
    try:  # the one reliable test (root ignores permission bits; some file systems refuse anyway)
        os.rmdir(tempfile.mkdtemp(prefix=".compress-probe-", dir=ancestor))
    except OSError as error:
        reason = "is not writable" if isinstance(error, PermissionError) else f"cannot be written ({error.strerror})"
        raise OutputError(f"output {final}: {ancestor} {reason}; give another path with {option}") from None


# ----------------------------------------------------------------------------------- leftovers
def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OSError:
        return False
    return True


def _size_mb(folder: Path) -> float:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total / 2**20


def clean_leftovers(parent: Path) -> list[str]:
    """Remove the staging (``.NAME.tmp-<pid>``) and replaced (``.NAME.old-<pid>``) folders that killed
    runs left in ``parent``; report, without removing, look-alikes that carry no compress marker.
    Returns the notes (also printed)."""
    notes: list[str] = []
    try:
        entries = list(Path(parent).iterdir())
    except OSError:
        return notes
    for entry in entries:
        match = _LEFTOVER.match(entry.name)
        if match is None or not entry.is_dir() or entry.is_symlink() or _pid_alive(int(match["pid"])):
            continue
        marked = (entry / STAGING_MARKER).is_file() or (entry / OUTPUT_MARKER).is_file()
        size = _size_mb(entry)
        if marked:
            shutil.rmtree(entry, ignore_errors=True)
            notes.append(f"removed {entry} ({size:.0f} MB), left by an interrupted compress run")
        else:
            notes.append(f"{entry} ({size:.0f} MB) looks like a folder left by an interrupted run of an older "
                         "compress; it has no marker, so it was kept: remove it yourself if you do not need it")
    for note in notes:
        notice(note)
    return notes


# ----------------------------------------------------------------------------------- staging
class OutputFolder:
    """A staging folder beside ``final`` that becomes ``final`` on :meth:`commit`.

    Construction checks the output (see :func:`check_output_folder`), removes leftovers of killed
    runs, and creates the staging folder with a staging marker; ``commit`` writes the output marker,
    re-checks the destination (it may have changed during a long run) and renames into place.
    """

    def __init__(self, final: Path, *, overwrite: bool = False, kind: str = "run", option: str = "--output"):
        self.final = Path(final)
        self.overwrite = overwrite
        self.kind = kind
        self.option = option
        check_output_folder(self.final, overwrite=overwrite, option=option)
        parent = self.final.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OutputError(f"output folder {self.final}: cannot create {parent} "
                              f"({error.strerror or error}); give another path with {option}") from None
        clean_leftovers(parent)
        self.path = parent / f".{self.final.name}.tmp-{os.getpid()}"
        if self.path.exists():
            shutil.rmtree(self.path)
        try:
            self.path.mkdir()
            (self.path / STAGING_MARKER).write_text(json.dumps({"pid": os.getpid(), "output": self.final.name}))
        except OSError as error:
            shutil.rmtree(self.path, ignore_errors=True)
            raise OutputError(f"output folder {self.final}: cannot write into {parent} "
                              f"({error.strerror or error}); give another path with {option}") from None

    def commit(self) -> Path:
        """Mark the staging folder as a finished output and rename it to ``final``."""
        from compress import __version__

        check_output_folder(self.final, overwrite=self.overwrite, option=self.option)
        marker = {"tool": "compress", "version": __version__, "kind": self.kind,
                  "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        (self.path / OUTPUT_MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")
        (self.path / STAGING_MARKER).unlink(missing_ok=True)
        old = None
        if self.final.exists():
            old = self.final.parent / f".{self.final.name}.old-{os.getpid()}"
            os.rename(self.final, old)
        try:
            os.rename(self.path, self.final)
        except OSError:
            if old is not None:  # put the previous output back
                os.rename(old, self.final)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.final

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


# ----------------------------------------------------------------------------------- single files
def check_output_file(path: Path, *, is_own, overwrite: bool = False, option: str = "--output") -> None:
    """Raise OutputError unless ``path`` may be (re)written: it does not exist, or ``is_own(path)``
    says compress wrote it, or ``overwrite``; never a folder or a link."""
    path = Path(path)
    if path.is_symlink() or path.is_dir():
        raise OutputError(f"output {path} {_describe_existing(path)}; give another path with {option}")
    if path.exists() and not overwrite and not is_own(path):
        raise OutputError(f"output {path} already exists and compress did not write it; it is left as it is. "
                          f"Give another path with {option}, or pass --overwrite to replace it")
    if not path.exists():
        _check_parent(path, option)


def make_folder(folder: Path, option: str) -> Path:
    """``mkdir -p`` with a clear OutputError instead of an OSError."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError(f"{option} {folder}: a file of that name exists; give a folder path") from None
    except OSError as error:
        raise OutputError(f"{option} {folder}: cannot create it ({error.strerror or error})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{option} {folder}: not writable")
    return folder
