"""The schema of a batch file: the pydantic models of its fields (jobs, grid, executor,
workers, retries, resources) and the resources one job resolves to."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Optional

from pydantic import ByteSize, Field, field_validator

from compress.recipe.problems import show_value
from compress.recipe.schema import StrictSection

JOB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,99}$")


def check_job_name(value: str) -> str:
    """``value`` when it can name a folder on any filesystem; ValueError otherwise."""
    if not JOB_NAME.match(value):
        raise ValueError(
            f"must be a folder-safe name: letters, digits, '.', '_', '+', '-', starting with a letter or digit, "
            f"at most 100 characters (got {show_value(value)})"
        )
    return value


Ratio = Annotated[float, Field(gt=0, lt=1)]


class ResourcesSpec(StrictSection):
    """What one job asks the Ray scheduler for; an unset field keeps the value from the level above."""

    cpus: Optional[float] = Field(None, gt=0, description="CPU cores per job (default 1).")
    gpus: Optional[float] = Field(None, ge=0, description="GPUs per job, fractions allowed (default 0).")
    memory: Optional[ByteSize] = Field(None, gt=0, description="Memory per job: bytes or e.g. 16GiB (default: none).")


@dataclass(frozen=True)
class Resources:
    """The resolved resources of one job: CPU cores, GPUs, and memory in bytes (None: no reservation)."""

    cpus: float = 1.0
    gpus: float = 0.0
    memory: Optional[int] = None

    def updated(self, spec: Optional[ResourcesSpec]) -> "Resources":
        """A copy with every field that ``spec`` sets replaced."""
        if spec is None:
            return self
        return dataclasses.replace(self, **{k: (int(v) if k == "memory" else v)
                                            for k, v in spec.model_dump().items() if v is not None})


class JobEntrySpec(StrictSection):
    """One entry of ``jobs``: a recipe file, optionally renamed and with fields overridden."""

    recipe: str = Field(min_length=1, description="Recipe YAML, relative to the batch file.")
    name: Optional[str] = Field(None, description="Job name (its folder under output); default: the recipe's name.")
    overrides: dict[str, Any] = Field(default_factory=dict, description="Recipe fields to replace.")
    resources: Optional[ResourcesSpec] = None

    @field_validator("name")
    @classmethod
    def _folder_safe(cls, value: Optional[str]) -> Optional[str]:
        return None if value is None else check_job_name(value)


class GridSpec(StrictSection):
    """``grid``: the jobs models × passes × ratios, each a copy of ``base`` with those fields replaced."""

    base: str = Field(min_length=1, description="Recipe YAML every grid job starts from, relative to the batch file.")
    models: Optional[list[Annotated[str, Field(min_length=1)]]] = Field(None, min_length=1)
    passes: Optional[list[Any]] = Field(None, min_length=1, description="Each a pass name, one pass, or a pass list.")
    ratios: Optional[list[Ratio]] = Field(None, min_length=1)
    overrides: dict[str, Any] = Field(default_factory=dict)
    resources: Optional[ResourcesSpec] = None


class BatchSpec(StrictSection):
    """The whole batch file."""

    output: Optional[str] = Field(None, min_length=1, description="Root folder; default outputs/<batch file stem>.")
    executor: Literal["local", "ray"] = "local"
    workers: int = Field(1, ge=1, description="local: jobs run at once, each in its own process.")
    address: Optional[str] = Field(None, min_length=1, description="ray: cluster address (else RAY_ADDRESS, else local).")
    retries: int = Field(1, ge=0, description="Extra attempts for a job that raises.")
    resources: Optional[ResourcesSpec] = None
    jobs: list[JobEntrySpec] = Field(default_factory=list)
    grid: Optional[GridSpec] = None
