"""Running an exported decoder folder in onnxruntime-genai (the runtime of ``compress generate
--runtime genai`` and of the ``genai_generation_identical`` gate).

The folder is the one :mod:`exporters.onnx` writes: the graph, ``genai_config.json`` and the
tokenizer files. onnxruntime-genai is an optional dependency (the ``cpu`` extra installs
``onnxruntime-genai``, the ``gpu`` extra ``onnxruntime-genai-cuda``); without it these functions
raise a CompressError that says what to install.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

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

    ``device``: cpu, or cuda / cuda:N (needs onnxruntime-genai-cuda; no fallback to the CPU).
    ``threads``: ONNX Runtime intra-op threads (None: its default)."""

    def __init__(self, folder: Path, device: str = "cpu", threads: int | None = None):
        from exporters.genai import GENAI_CONFIG_FILE

        og = import_genai()
        self.folder = Path(folder)
        if not (self.folder / GENAI_CONFIG_FILE).is_file():
            raise CompressError(f"{self.folder}: no {GENAI_CONFIG_FILE} (export the model again with this version "
                                "of compress to run it in onnxruntime-genai)")
        config = og.Config(str(self.folder))
        if threads:
            config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
        config.clear_providers()
        if device.startswith("cuda"):
            config.append_provider("cuda")
            if ":" in device:
                config.set_provider_option("cuda", "device_id", device.split(":", 1)[1])
        self.device = device
        self._running = None  # the generator of the last prefill
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

    def generator(self, length: int, stop_at_eos: bool = False, batch: int = 1):
        """A greedy genai generator for sequences of ``length`` tokens; without ``stop_at_eos`` the
        end-of-text token is masked (genai's ``min_length``), so it is never chosen."""
        og = import_genai()
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=length, min_length=0 if stop_at_eos else length, do_sample=False,
                                  batch_size=batch)
        return og.Generator(self.model, params)

    def prefill(self, ids: list[int], room: int = 1) -> None:
        """Run ``ids`` from an empty cache, with ``room`` tokens to generate after them by :meth:`step`
        (end-of-text masked). genai sizes its buffers by the whole length, so keep ``room`` tight."""
        self._running = self.generator(len(ids) + room)
        self._running.append_tokens(list(ids))

    def prefill_batch(self, ids: list[int], batch: int) -> None:
        """Run ``batch`` copies of ``ids`` at once (a batched prefill)."""
        self.generator(len(ids) + 1, batch=batch).append_tokens(np.array([ids] * batch, dtype=np.int32))

    def step(self) -> int:
        """One greedy decoding step after :meth:`prefill`: the next token."""
        self._running.generate_next_token()
        return int(self._running.get_next_tokens()[0])

    def logits(self, ids: list[int]) -> np.ndarray:
        """Logits [len(ids), vocab] of one sequence, from an empty cache."""
        self.prefill(ids)
        return np.asarray(self._running.get_output("logits"))[0]

    def greedy_generate(self, prompt: list[int], max_new_tokens: int = 32, stop_at_eos: bool = True) -> Generation:
        """Greedy continuation of ``prompt`` (token ids). Without ``stop_at_eos`` the end-of-text
        token is masked, so it is never chosen."""
        if not prompt:
            raise CompressError("the prompt is empty after tokenisation")
        generator = self.generator(len(prompt) + max_new_tokens, stop_at_eos)
        generator.append_tokens(list(prompt))
        tokens: list[int] = []
        while not generator.is_done() and len(tokens) < max_new_tokens:
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
        return Generation(prompt=list(prompt), tokens=tokens)
