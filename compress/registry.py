"""Registry of passes by name.

A pass is declared in two parts. Its *declaration* is a light class (pydantic and the standard
library only, no torch) decorated with :func:`register_pass`: a docstring, the ``Options`` model,
``kinds``, ``needs_calibration`` (and ``replays_details`` where it applies), and where the
*implementation* lives, as ``"module:Class"``. The implementation subclasses the declaration and
adds ``run`` (and ``replay``). The recipe names the pass by its name; listing the passes and
validating a recipe's options read the declarations only, and the implementation is imported the
first time :attr:`PassSpec.cls` is read, i.e. when the pass is run or a plan step replayed.

A class registered without ``implementation`` is its own implementation (registered eagerly).

Passes are found as plugins: every entry point of the group ``compress.passes`` (the built-in
ones are declared in pyproject.toml and point at the declarations) is loaded the first time a pass
is looked up, so the core never imports a method by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import Callable, Union

from pydantic import BaseModel


@dataclass(frozen=True)
class PassSpec:
    """What the core knows of a pass without importing its implementation."""

    name: str
    options: type[BaseModel]
    summary: str
    implementation: Union[str, type]  # "module:Class" (imported on first use), or the class itself
    kinds: tuple[str, ...] = ()  # the model kinds the pass works on (see compress.kinds)
    needs_calibration: bool = False
    replays_details: bool = False  # `compress apply` replays the step from its JSON details (no tensors)
    streams: bool = False  # runs out of core, block by block (a StructuredPruner over streamed blocks)
    ratio_of: str = "weights"  # what its `ratio` option is a share of: "weights" (decoder linears) or "heads"

    @property
    def cls(self) -> type:
        """The implementation class (imported now if it is not yet)."""
        return self.load()

    def load(self) -> type:
        """Import the implementation and check it carries this declaration's options."""
        if isinstance(self.implementation, type):
            return self.implementation
        module_name, _, attribute = self.implementation.partition(":")
        target = import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
        if getattr(target, "Options", None) is not self.options:
            raise TypeError(f"pass {self.name!r}: {self.implementation} does not carry the Options of its "
                            "declaration (the implementation should subclass the declaration)")
        return target


_REGISTRY: dict[str, PassSpec] = {}


def register_pass(name: str, implementation: str | None = None) -> Callable[[type], type]:
    """Class decorator: register a pass under ``name``. The class needs ``Options`` and a docstring
    (its first line is the pass's summary). ``implementation``: where the class that runs the pass
    lives (``"module:Class"``, imported on first use); left out, the decorated class runs it."""

    def decorate(cls: type) -> type:
        summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        spec = PassSpec(
            name=name,
            options=cls.Options,
            summary=summary,
            implementation=implementation or cls,
            kinds=tuple(getattr(cls, "kinds", ())),
            needs_calibration=bool(getattr(cls, "needs_calibration", False)),
            replays_details=bool(getattr(cls, "replays_details", False)),
            streams=bool(getattr(cls, "streams", False)),
            ratio_of=str(getattr(cls, "ratio_of", "weights")),
        )
        existing = _REGISTRY.get(name)
        if existing is not None and (existing.options is not spec.options
                                     or existing.implementation != spec.implementation):
            raise ValueError(f"pass {name!r} registered twice")
        _REGISTRY[name] = spec
        cls.name = name
        return cls

    return decorate


ENTRY_POINT_GROUP = "compress.passes"
_loaded = False


def _load_builtin_passes() -> None:
    """Load every pass plugin once (loading a pass declaration registers it)."""
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
