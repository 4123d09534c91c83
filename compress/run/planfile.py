"""``compress plan RECIPE -o plan.json|DIR``: run the passes' scoring and allocation, write the plan.

Nothing is exported or evaluated: the output is ``plan.json`` (and the step artifacts beside it),
which ``compress apply plan.json --model M -o DIR`` turns into the same weights a ``compress run``
of the recipe writes. Data-free passes (``magnitude_sp``; ``spa`` with magnitude importance or a
synthetic / identity Hessian) read no calibration text, so a recipe made of them needs no corpus
(``calibration: null``). With ``max_memory`` the passes run out of core (one block in memory).

The plan is written to a temporary folder and moved into place at the end, so an interrupted
run leaves no half-written plan; a file compress did not write is never replaced (``--overwrite``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from compress.errors import OutputError
from compress.outputs import check_output_file, forbidden_output_reason, make_folder
from compress.plan import PLAN_FORMAT, Plan
from compress.run.runner import make_plan

PLAN_FILE = "plan.json"


@dataclass
class PlanResult:
    """Where the plan went, the plan, and what it changes (for the summary)."""

    path: Path
    plan: Plan
    files: list[str]
    summary: dict = field(default_factory=dict)


def write_plan(recipe, output: Path, *, device: str | None = None, progress: bool = True,
               overwrite: bool = False) -> PlanResult:
    """Run ``recipe``'s passes (scoring, allocation, surgery on the in-memory or streamed model) and
    write the plan to ``output``; nothing else is written."""
    folder, name = plan_destination(output)
    check_plan_destination(folder, name, overwrite)
    plan, summary, _monitor = make_plan(recipe, device=device, progress=progress)
    check_plan_destination(folder, name, overwrite, plan)
    files = save_plan(plan, folder, name)
    return PlanResult(path=folder / name, plan=plan, files=files, summary=summary)


def plan_destination(output: Path) -> tuple[Path, str]:
    """(folder, file name): ``x.json`` is the plan file itself, anything else a folder for plan.json."""
    output = Path(output)
    if output.suffix.lower() == ".json":
        return output.parent, output.name
    return output, PLAN_FILE


def is_compress_plan(path: Path) -> bool:
    """True when ``path`` is a plan file compress wrote (JSON with the plan format tag)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4096)
    except OSError:
        return False
    return PLAN_FORMAT.encode() in head


def check_plan_destination(folder: Path, name: str, overwrite: bool, plan: Plan | None = None) -> None:
    """Refuse (OutputError) to write the plan over a file compress did not write: the plan file
    itself, or (with ``plan``) one of its artifact files when no compress plan sits beside them."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"--output {folder}: is a file, not a folder; give a .json path or a folder")
    reason = forbidden_output_reason(folder / name)
    if reason is not None:
        raise OutputError(f"--output {folder / name}: refused because {reason}")
    plan_path = folder / name
    own_plan = is_compress_plan(plan_path)
    check_output_file(plan_path, is_own=is_compress_plan, overwrite=overwrite)
    for file in (plan.save_names(plan_path) if plan is not None else [])[1:]:
        check_output_file(folder / file, is_own=lambda _: own_plan, overwrite=overwrite)


def save_plan(plan: Plan, folder: Path, name: str = PLAN_FILE) -> list[str]:
    """Write the plan (and its artifacts) into a temporary folder beside ``folder``, then move each
    file into ``folder``; returns the file names."""
    folder = make_folder(Path(folder), "--output")
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=folder))
    try:
        files = plan.save(staging / name)
        for file in files[1:] + files[:1]:  # the artifacts first, plan.json (which names them) last
            os.replace(staging / file, folder / file)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return files


