"""Pydantic's validation errors and a field's constraints in the user's words: ``must be > 0 and
< 1 (got 1.5)``, ``unknown field; allowed here: ...``. :func:`describe_bounds` also words the
bounds of pass options for ``compress passes``."""

from __future__ import annotations

import types
import typing
from typing import Annotated, Any, Literal, Union

import annotated_types
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from compress.recipe.problems import RecipeProblem, show_value


_BOUND_SYMBOLS = (
    (annotated_types.Gt, "gt", ">"),
    (annotated_types.Ge, "ge", ">="),
    (annotated_types.Lt, "lt", "<"),
    (annotated_types.Le, "le", "<="),
)


def _number(value: Any) -> str:
    return repr(int(value)) if isinstance(value, float) and value.is_integer() else repr(value)


def describe_bounds(field: FieldInfo) -> str:
    """The numeric/length constraints of a field in words, e.g. ``> 0 and < 1``; empty if none."""
    parts = []
    for item in field.metadata:
        for cls, attr, symbol in _BOUND_SYMBOLS:
            if isinstance(item, cls):
                parts.append(f"{symbol} {_number(getattr(item, attr))}")
        if isinstance(item, annotated_types.MultipleOf):
            parts.append(f"a multiple of {_number(item.multiple_of)}")
        if isinstance(item, annotated_types.MinLen) and item.min_length:
            parts.append(f"at least {item.min_length} long")
        if isinstance(item, annotated_types.MaxLen):
            parts.append(f"at most {item.max_length} long")
    return " and ".join(parts)


def literal_choices(annotation: Any) -> tuple[Any, ...] | None:
    """The allowed values of a ``Literal`` (possibly inside ``Optional``), else None."""
    annotation = _strip_optional(annotation)
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    return None


def _strip_optional(annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _strip_optional(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(members) == 1:
            return _strip_optional(members[0])
    return annotation


def _lookup(model_cls: type[BaseModel], loc: tuple[str | int, ...]) -> tuple[type[BaseModel] | None, FieldInfo | None]:
    """Follow ``loc`` through nested models/lists: (the model holding the last key, that key's field)."""
    current: Any = model_cls
    holder: type[BaseModel] | None = None
    field: FieldInfo | None = None
    for part in loc:
        current = _strip_optional(current)
        if isinstance(part, int):
            args = typing.get_args(current)
            if typing.get_origin(current) not in (list, tuple) or not args:
                return None, None
            current, field, holder = args[0], None, None
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None, None
        holder = current
        field = _field_by_key(current, part)
        if field is None:
            return holder, None
        current = field.annotation
    return holder, field


def _field_by_key(model_cls: type[BaseModel], key: str) -> FieldInfo | None:
    for name, field in model_cls.model_fields.items():
        if key in (name, field.alias):
            return field
    return None


def field_keys(model_cls: type[BaseModel]) -> list[str]:
    """The keys a user writes for a model's fields (aliases where set)."""
    return [field.alias or name for name, field in model_cls.model_fields.items()]


_TYPE_WORDS = {
    "int_type": "a whole number",
    "int_parsing": "a whole number",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "tuple_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "finite_number": "a finite number (not .inf or .nan)",
}
_BOUND_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "multiple_of"}


def explain_error(error: dict[str, Any], model_cls: type[BaseModel]) -> str:
    """Turn one pydantic error into ``what is allowed (got X)`` wording."""
    kind = error["type"]
    loc = tuple(error["loc"])
    got = show_value(error.get("input"))
    ctx = error.get("ctx") or {}
    holder, field = _lookup(model_cls, loc)
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        allowed = ", ".join(field_keys(holder)) if holder is not None else ""
        return f"unknown field; allowed here: {allowed}" if allowed else "unknown field"
    if kind in ("literal_error", "enum"):
        choices = literal_choices(field.annotation) if field is not None else None
        allowed = ", ".join(str(c) for c in choices) if choices else ctx.get("expected", "")
        return f"must be one of: {allowed} (got {got})"
    if kind in _BOUND_ERRORS:
        bounds = describe_bounds(field) if field is not None else ""
        if not bounds:
            bounds = " and ".join(
                f"{symbol} {_number(ctx[attr])}" for _, attr, symbol in _BOUND_SYMBOLS if attr in ctx
            )
        return f"must be {bounds} (got {got})"
    if kind in ("too_short", "too_long"):
        limit = ctx.get("min_length") if kind == "too_short" else ctx.get("max_length")
        word = "at least" if kind == "too_short" else "at most"
        return f"must have {word} {limit} item(s) (got {ctx.get('actual_length', '?')})"
    if kind in _TYPE_WORDS:
        return f"must be {_TYPE_WORDS[kind]} (got {got})"
    if kind == "value_error" and "error" in ctx:
        return str(ctx["error"])
    return f"{error.get('msg', kind)} (got {got})"


def problems_from(error: ValidationError, model_cls: type[BaseModel], prefix: tuple = ()) -> list[RecipeProblem]:
    """Every error of a pydantic ValidationError as a RecipeProblem with the YAML path under ``prefix``."""
    return [
        RecipeProblem(loc=prefix + tuple(item["loc"]), message=explain_error(item, model_cls))
        for item in error.errors()
    ]
