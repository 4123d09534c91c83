"""The ``compress`` command line: run recipes, list passes, inspect and evaluate models, replay plans.

One module per job: :mod:`~compress.cli.common` (the app, error handling, shared options),
:mod:`~compress.cli.run` (run, plan, apply, validate and the run summary), :mod:`~compress.cli.batch`,
:mod:`~compress.cli.evaluate` (eval, generate), :mod:`~compress.cli.inspect_model` and
:mod:`~compress.cli.passes`. Importing them registers their commands on :data:`app`.

Heavy modules (torch, transformers, the runner) are imported inside each command, so
``compress --help`` stays quick. Every :class:`~compress.errors.CompressError` raised by a command
is caught in one place (:class:`~compress.cli.common.CompressGroup`) and printed as
``error: <message>`` on stderr with the error's exit code (2 for bad input, 3 for a failed gate) —
never a traceback.
"""

from __future__ import annotations

# imported for their commands, in the order --help lists them
from compress.cli import run  # noqa: F401,I001
from compress.cli import batch  # noqa: F401
from compress.cli import evaluate  # noqa: F401
from compress.cli import passes  # noqa: F401
from compress.cli import inspect_model  # noqa: F401
from compress.cli.common import app

__all__ = ["app"]
