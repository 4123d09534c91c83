"""``compress passes``: the registered passes and their options."""

from __future__ import annotations

import json
import types
import typing
from enum import Enum
from typing import Annotated, Any, Union

from rich.markup import escape
from rich.table import Table

from compress.cli.common import stdout_console, app


@app.command("passes")
def passes_command() -> None:
    """List the registered passes, what each does, and its options (the keys a recipe may set)."""
    from compress.registry import available_passes

    console = stdout_console()
    specs = available_passes()
    if not specs:
        console.print("no passes are registered")
        return
    for spec in specs.values():
        console.print(pass_options_table(spec))


def pass_options_table(spec: Any) -> Table:
    """One pass as a table: option, type (with bounds), default, description."""
    from compress.recipe import describe_bounds

    title = f"[bold]{escape(spec.name)}[/bold]" + (f" — {escape(spec.summary)}" if spec.summary else "")
    table = Table(title=title, title_justify="left", expand=False)
    table.add_column("option", style="cyan", no_wrap=True)
    table.add_column("type")
    table.add_column("default")
    table.add_column("description")
    for name, field in spec.options.model_fields.items():
        bounds = describe_bounds(field)
        kind = type_label(field.annotation) + (f" ({bounds})" if bounds else "")
        cells = (field.alias or name, kind, default_label(field), field.description or "")
        table.add_row(*(escape(cell) for cell in cells))
    if not spec.options.model_fields:
        table.add_row("—", "", "", "this pass has no options")
    return table


def type_label(annotation: Any) -> str:
    """A readable type: ``float``, ``wifv | ifv | wifn``, ``int | null``, ``list[int]``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Annotated:
        return type_label(args[0])
    if origin in (Union, types.UnionType):
        return " | ".join(type_label(arg) for arg in args)
    if origin is typing.Literal:
        return " | ".join(str(arg) for arg in args)
    if annotation is type(None):
        return "null"
    if origin is not None and args:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_label(a) for a in args)}]"
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def default_label(field: Any) -> str:
    """A field's default in YAML-ish form, or ``required``."""
    if field.is_required():
        return "required"
    try:
        value = field.get_default(call_default_factory=True, validated_data={})
    except TypeError:
        value = field.get_default(call_default_factory=True)
    if hasattr(value, "model_dump"):
        value = value.model_dump(mode="json")
    if isinstance(value, Enum):
        value = value.value
    try:
        return json.dumps(value) if not isinstance(value, str) else value
    except TypeError:
        return str(value)


# ------------------------------------------------------------------------------------ inspect
