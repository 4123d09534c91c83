"""Shared parts of the ``compress`` command line (the app, error handling, options): run recipes, list passes, inspect and evaluate models, replay plans.

Heavy modules (torch, transformers, the runner) are imported inside each command, so
``compress --help`` stays quick. Every :class:`~compress.errors.CompressError` raised by a command
is caught in one place (:class:`CompressGroup`) and printed as ``error: <message>`` on stderr with
the error's exit code (2 for bad input, 3 for a failed gate) — never a traceback.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperGroup

from compress.errors import CompressError


EXIT_GATE_FAILED = 3
EXIT_INTERRUPTED = 130


# ------------------------------------------------------------------------------------ errors
def print_error(message: str) -> None:
    """``error: <message>`` in red on stderr; continuation lines are indented under the message."""
    console = Console(stderr=True, soft_wrap=True, highlight=False)
    first, *rest = message.splitlines() or [""]
    text = Text("error: ", style="bold red")
    text.append(first, style="red")
    for line in rest:
        text.append("\n       " + line, style="red")
    console.print(text)


class CompressGroup(TyperGroup):
    """The command group; turns user errors from any command into a message and an exit code."""

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CompressError as error:
            print_error(str(error))
            raise typer.Exit(error.exit_code) from None
        except KeyboardInterrupt:
            print_error("interrupted")
            raise typer.Exit(EXIT_INTERRUPTED) from None


app = typer.Typer(
    name="compress",
    cls=CompressGroup,
    help=(
        "Ahead-of-time structured compression of Hugging Face models.\n\n"
        "Write a recipe (model, calibration text, passes, export, gates) and run it with "
        "[bold]compress run recipe.yaml[/bold]. See docs/recipes.md for every recipe field."
    ),
    rich_markup_mode="rich",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class DTypeChoice(str, Enum):
    """Weight dtypes a model can be loaded in."""

    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


def stdout_console() -> Console:
    return Console(highlight=False)


# ------------------------------------------------------------------------------------ option checks
def device_option(value: Optional[str]) -> Optional[str]:
    """Validate ``--device`` (auto, cpu, cuda, cuda:N), resolve ``auto``, and refuse CUDA without a GPU."""
    if value is None:
        return None
    from compress.devices import resolve_device

    try:
        return resolve_device(value)
    except CompressError as error:
        raise typer.BadParameter(str(error)) from None


def data_option(values: list[str]) -> list[str]:
    """Validate every ``--data`` source before a model is loaded."""
    from compress.recipe import check_text_source

    for value in values:
        try:
            check_text_source(value)
        except ValueError as error:
            raise typer.BadParameter(str(error)) from None
    return values


def version_option(value: bool) -> None:
    if value:
        from compress import __version__

        typer.echo(f"compress {__version__}")
        raise typer.Exit()


DeviceOption = Annotated[
    Optional[str],
    typer.Option(
        "--device",
        help="Device to run on: auto (a GPU when one is visible, else the CPU), cpu, cuda or cuda:N.",
        callback=device_option,
        show_default=False,
    ),
]
DTypeOption = Annotated[DTypeChoice, typer.Option("--dtype", help="Dtype to load the weights in.")]
TrustRemoteCodeOption = Annotated[
    bool,
    typer.Option("--trust-remote-code", help="Allow a model folder's own Python code to run while loading it."),
]
OverwriteOption = Annotated[
    bool,
    typer.Option(
        "--overwrite",
        help="Replace an existing output that compress did not write. Without it, such an output is refused "
        "and left as it is; an output compress wrote itself (it carries a .compress-output marker) is always "
        "replaced. A file, a link, /, your home folder and the working directory are never replaced.",
    ),
]
QuietOption = Annotated[
    bool,
    typer.Option(
        "--quiet", "-q", help="Print only errors, gate failures and the output folder; no summary or progress bars."
    ),
]


def size_option(value: Optional[str]) -> Optional[int]:
    """``--max-memory``: bytes from ``8GiB``, ``512MiB``, ``2GB`` or a number of bytes."""
    if value is None:
        return None
    from compress.memory import parse_size

    try:
        return parse_size(value, "--max-memory")
    except CompressError as error:
        raise typer.BadParameter(str(error)) from None


MaxMemoryOption = Annotated[
    Optional[str],
    typer.Option(
        "--max-memory",
        help="Prune out of core under this much resident memory (e.g. 8GiB): blocks are read from the "
        "checkpoint one at a time, pruned, written and freed; replaces the recipe's max_memory (docs/scale.md).",
        show_default=False,
    ),
]
OffloadDirOption = Annotated[
    Optional[Path],
    typer.Option(
        "--offload-dir",
        help="Out of core: keep the calibration activations in this folder on disk (one file per batch); "
        "replaces the recipe's offload_dir.",
        show_default=False,
    ),
]


def memory_overrides(recipe: Any, max_memory: Optional[str], offload_dir: Optional[Path]) -> Any:
    """The recipe with ``--max-memory`` / ``--offload-dir`` applied and checked."""
    size = size_option(max_memory)
    if offload_dir is not None and size is None and recipe.max_memory is None:
        raise CompressError("--offload-dir is only used out of core: add --max-memory (or max_memory in the recipe)")
    recipe = recipe.with_overrides(max_memory=size, offload_dir=offload_dir)
    if recipe.max_memory is not None:
        from compress.kinds.decoder_streamed import check_out_of_core

        check_out_of_core(recipe)
    return recipe


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option("--version", help="Print the compress version and exit.", callback=version_option, is_eager=True),
    ] = False,
) -> None:
    """Ahead-of-time structured compression of Hugging Face models."""


