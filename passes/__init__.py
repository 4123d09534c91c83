"""Built-in passes, one package per method. A package's ``__init__`` is the pass's light declaration
(docs, options, what it needs; no torch); its ``run`` module (``passes.spa.prune`` for SPA) holds
the implementation, whose pass class subclasses the declaration. compress finds the declarations
through the ``compress.passes`` entry points declared in pyproject.toml and imports an
implementation only when its pass runs (see compress.registry)."""
