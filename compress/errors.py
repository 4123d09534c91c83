"""User-facing errors.

Anything raised as a :class:`CompressError` is printed by the CLI as one clear message (no
traceback) and turns into a non-zero exit code. Raise it for bad input: a recipe field, a file
that does not exist, a model that cannot be loaded offline. Bugs stay ordinary exceptions.
"""

from __future__ import annotations


class CompressError(Exception):
    """An error caused by the user's input, with a message that says what to change."""

    exit_code = 2


class RecipeError(CompressError):
    """A recipe that does not validate. The message names the YAML path of each bad field."""


class ModelSourceError(CompressError):
    """A model source that cannot be resolved or loaded (missing folder, hub id not cached, pickle)."""


class DataSourceError(CompressError):
    """A text/calibration source that cannot be read."""


class PlanError(CompressError):
    """A plan file that does not fit the model it is applied to."""


class OutputError(CompressError):
    """An output path that compress may not write: a file or folder it did not write itself, a
    protected folder (root, home, the working directory), or a folder it cannot create or write."""


class GateError(CompressError):
    """A validation gate failed; the message names the metric, its value and the threshold."""

    exit_code = 3
