"""compress: ahead-of-time structured compression of Hugging Face models."""

from __future__ import annotations

__version__ = "0.1.0"

from compress.errors import CompressError  # noqa: E402

__all__ = ["CompressError", "__version__"]


def _register_auto_classes() -> None:
    # Importing the pruned-model family registers it with the transformers Auto classes, so
    # `AutoModelForCausalLM.from_pretrained(out_dir)` works after `import compress`.
    try:
        from compress.models import pruned_llama  # noqa: F401
    except ImportError:  # pragma: no cover - only while the module is being written
        pass


_register_auto_classes()
