"""compress: ahead-of-time structured compression of Hugging Face models.

Importing the package is cheap (no torch, no transformers), so ``compress --help`` answers at
once. The pruned-model classes (``pruned_llama``) are registered with the transformers Auto classes
when transformers is imported — at once if it already is, else right after its own import — so
``AutoModelForCausalLM.from_pretrained(out_dir)`` works after ``import compress`` either way.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

from compress.errors import CompressError  # noqa: E402

__all__ = ["CompressError", "__version__"]


def _register_auto_classes() -> None:
    from compress.models import pruned_llama  # noqa: F401  (registering is a side effect of the import)


class _AfterTransformers(importlib.abc.MetaPathFinder):
    """A post-import hook: when ``transformers`` is imported, run its module, then register ours."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)  # the finders after this one
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            _register_auto_classes()

        spec.loader.exec_module = exec_module
        return spec


if "transformers" in sys.modules:
    _register_auto_classes()
elif not any(isinstance(finder, _AfterTransformers) for finder in sys.meta_path):
    sys.meta_path.insert(0, _AfterTransformers())
