"""Running an exported decoder folder in onnxruntime-genai (the runtime of ``compress generate
--runtime genai`` and of the ``genai_generation_identical`` gate).

The folder is the one :mod:`exporters.onnx` writes: the graph, ``genai_config.json`` and the
tokenizer files. onnxruntime-genai is an optional dependency (the ``cpu`` extra installs
``onnxruntime-genai``, the ``gpu`` extra ``onnxruntime-genai-cuda``); without it these functions
raise a CompressError that says what to install.
"""

from __future__ import annotations

from pathlib import Path

from compress.errors import CompressError
from compress.onnx_runtime import Generation

__all__ = ["GenaiDecoder", "genai_available", "import_genai"]


def import_genai():
    """The ``onnxruntime_genai`` module, or a clear error naming the extra to install."""
    try:
        import onnxruntime_genai
    except ImportError:
        raise CompressError("onnxruntime-genai is not installed: pip install 'compress[cpu]' "
                            "(onnxruntime-genai) or 'compress[gpu]' (onnxruntime-genai-cuda)") from None
    return onnxruntime_genai


def genai_available() -> bool:
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return False
    return True


class GenaiDecoder:
    """An exported decoder folder opened in onnxruntime-genai.

    ``device``: cpu, or cuda / cuda:N (needs onnxruntime-genai-cuda; no fallback to the CPU)."""

    def __init__(self, folder: Path, device: str = "cpu"):
        from exporters.genai import GENAI_CONFIG_FILE

        og = import_genai()
        self.folder = Path(folder)
        if not (self.folder / GENAI_CONFIG_FILE).is_file():
            raise CompressError(f"{self.folder}: no {GENAI_CONFIG_FILE} (export the model again with this version "
                                "of compress to run it in onnxruntime-genai)")
        config = og.Config(str(self.folder))
        config.clear_providers()
        if device.startswith("cuda"):
            config.append_provider("cuda")
            if ":" in device:
                config.set_provider_option("cuda", "device_id", device.split(":", 1)[1])
        self.device = device
        try:
            self.model = og.Model(config)
        except Exception as error:  # genai raises RuntimeError for a bad graph, config or provider
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise CompressError(f"{self.folder}: onnxruntime-genai cannot load it ({first})") from None

    @property
    def provider(self) -> str:
        return f"onnxruntime-genai ({'CUDA' if self.device.startswith('cuda') else 'CPU'})"

    def tokenizer(self):
        """genai's own tokenizer for the folder (reads the tokenizer files beside the graph)."""
        return import_genai().Tokenizer(self.model)

    def greedy_generate(self, prompt: list[int], max_new_tokens: int = 32, stop_at_eos: bool = True) -> Generation:
        """Greedy continuation of ``prompt`` (token ids). Without ``stop_at_eos`` the end-of-text
        token is masked (genai's ``min_length``), so it is never chosen."""
        og = import_genai()
        if not prompt:
            raise CompressError("the prompt is empty after tokenisation")
        params = og.GeneratorParams(self.model)
        length = len(prompt) + max_new_tokens
        params.set_search_options(max_length=length, min_length=0 if stop_at_eos else length, do_sample=False)
        generator = og.Generator(self.model, params)
        generator.append_tokens(list(prompt))
        tokens: list[int] = []
        while not generator.is_done() and len(tokens) < max_new_tokens:
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
        return Generation(prompt=list(prompt), tokens=tokens)
