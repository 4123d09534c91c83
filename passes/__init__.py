"""Built-in passes, one module (or package) per method. compress finds them through the
``compress.passes`` entry points declared in pyproject.toml (see compress.registry)."""
