"""An expanded batch: :class:`BatchJob` (one named job, the validated recipe it runs, where it came
from, its resources) and :class:`Batch` (the file, output root, how to run, and the jobs in order)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from compress.batch.spec import Resources
from compress.recipe.schema import Recipe


@dataclass(frozen=True)
class BatchJob:
    """One expanded job: its unique name, the validated recipe it runs (``export.output`` is its
    folder), where in the batch file it came from, and the resources it asks for."""

    name: str
    recipe: Recipe
    origin: str
    resources: Resources = field(default_factory=Resources)

    @property
    def output_dir(self) -> Path:
        return Path(self.recipe.export.output)

    def recipe_data(self) -> dict[str, Any]:
        """The recipe as plain data, as the runner saves it in the folder (recipe.yaml)."""
        return self.recipe.to_dict()

    def outline(self) -> str:
        """``model: pass(ratio=0.2) → pass``, for listings."""
        steps = []
        for entry in self.recipe.passes:
            ratio = entry.options_dict().get("ratio")
            steps.append(f"{entry.name}(ratio={ratio:g})" if isinstance(ratio, (int, float)) else entry.name)
        return f"{self.recipe.model.source}: {' → '.join(steps) or 'no passes'}"


@dataclass(frozen=True)
class Batch:
    """A validated batch: its file, output root, how to run, and the expanded jobs in order."""

    source: Path
    output_root: Path
    executor: str
    workers: int
    address: Optional[str]
    retries: int
    jobs: tuple[BatchJob, ...]

    def with_settings(self, *, workers: Optional[int] = None, executor: Optional[str] = None) -> "Batch":
        """A copy with the worker count and/or executor replaced (the CLI's ``--workers``/``--executor``)."""
        changes = {k: v for k, v in (("workers", workers), ("executor", executor)) if v is not None}
        return dataclasses.replace(self, **changes)
