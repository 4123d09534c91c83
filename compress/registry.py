"""Registry of passes by name.

A pass module calls :func:`register_pass` on its class; the recipe names the pass by that name.
Each pass declares a pydantic ``Options`` model, so the recipe loader can validate a pass's options
(and name the YAML path of a bad one) before anything heavy runs.

Passes are found as plugins: every entry point of the group ``compress.passes`` (the built-in
ones are declared in pyproject.toml) is loaded the first time a pass is looked up, so the core
never imports a method by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from pydantic import BaseModel


@dataclass(frozen=True)
class PassSpec:
    name: str
    cls: type
    options: type[BaseModel]
    summary: str

    @property
    def kinds(self) -> tuple[str, ...]:
        """The model kinds the pass works on (see compress.kinds)."""
        return tuple(getattr(self.cls, "kinds", ()))

    @property
    def needs_calibration(self) -> bool:
        return bool(getattr(self.cls, "needs_calibration", False))


_REGISTRY: dict[str, PassSpec] = {}


def register_pass(name: str) -> Callable[[type], type]:
    """Class decorator: register a pass under ``name``. The class needs ``Options`` and a docstring."""

    def decorate(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name].cls is not cls:
            raise ValueError(f"pass {name!r} registered twice")
        summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        _REGISTRY[name] = PassSpec(name=name, cls=cls, options=cls.Options, summary=summary)
        cls.name = name
        return cls

    return decorate


ENTRY_POINT_GROUP = "compress.passes"
_loaded = False


def _load_builtin_passes() -> None:
    """Load every pass plugin once (loading a pass class registers it)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    from importlib.metadata import entry_points

    for entry in entry_points(group=ENTRY_POINT_GROUP):
        entry.load()


def available_passes() -> dict[str, PassSpec]:
    _load_builtin_passes()
    return dict(sorted(_REGISTRY.items()))


def get_pass(name: str) -> PassSpec | None:
    _load_builtin_passes()
    return _REGISTRY.get(name)
