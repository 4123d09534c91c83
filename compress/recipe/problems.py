"""How a bad recipe field is reported: :class:`RecipeProblem` (where and what), the one
:class:`RecipeValidationError` that lists them all, the YAML path of a location, and a user's
value rendered for a message."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from compress.errors import RecipeError


@dataclass(frozen=True)
class RecipeProblem:
    """One bad field: where it is (``loc``, as keys and indices) and what is wrong with it."""

    loc: tuple[str | int, ...]
    message: str

    @property
    def path(self) -> str:
        return yaml_path(self.loc)


class RecipeValidationError(RecipeError):
    """A recipe with one or more bad fields; the message has one line per problem."""

    def __init__(self, source_name: str, problems: list[RecipeProblem]):
        self.source_name = source_name
        self.problems = list(problems)
        lines = [f"{source_name}: {p.path}: {p.message}" if p.loc else f"{source_name}: {p.message}" for p in problems]
        super().__init__("\n".join(lines))


def yaml_path(loc: tuple[str | int, ...]) -> str:
    """``("passes", 0, "flap", "ratio")`` -> ``passes[0].flap.ratio``."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text or "(top level)"


def show_value(value: Any) -> str:
    """A short YAML-flavoured rendering of a user's value for an error message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, str):
        shown = value if len(value) <= 60 else value[:57] + "..."
        return f"'{shown}'"
    return repr(value)
