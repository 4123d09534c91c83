"""``python -m compress.cli``: the same command line as ``compress``."""

from compress.cli import app

app()
