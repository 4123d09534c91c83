"""Running an exported GGUF in llama.cpp itself, through llama-cpp-python (the GGUF gates and
benchmark). llama-cpp-python is built from source (``scripts/build_llama_cpp.sh``) and is optional:
without it the GGUF gates say they were skipped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from compress.errors import CompressError

__all__ = ["LlamaCppDecoder", "llama_cpp_available"]


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


class LlamaCppDecoder:
    """A GGUF file opened in llama.cpp on the CPU with every position's logits kept, and its KV cache
    in f32 (llama.cpp's default f16 cache alone moves logits by ~1e-3)."""

    def __init__(self, path: Path, n_ctx: int = 1024, threads: int | None = None):
        try:
            import llama_cpp
        except ImportError:
            raise CompressError("llama-cpp-python is not installed: bash scripts/build_llama_cpp.sh") from None
        self.path = Path(path)
        try:
            self.llm = llama_cpp.Llama(model_path=str(self.path), n_ctx=n_ctx, logits_all=True, verbose=False,
                                       n_threads=threads, n_threads_batch=threads, n_batch=512, n_gpu_layers=0,
                                       seed=0, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
        except Exception as error:  # llama.cpp refuses the file: a failed gate, with its words
            raise CompressError(f"{self.path}: llama.cpp cannot load it ({error})") from None

    def prefill(self, ids: list[int]) -> None:
        """Run ``ids`` from an empty cache."""
        self.llm.reset()
        self.llm.eval(list(ids))

    def next_token(self) -> int:
        """The argmax of the last position's logits."""
        return int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))

    def step(self) -> int:
        """One greedy decoding step: the next token, fed back through the cache."""
        token = self.next_token()
        self.llm.eval([token])
        return token

    def logits(self, ids: list[int]) -> np.ndarray:
        """Logits [len(ids), vocab] of one sequence, from an empty cache."""
        self.prefill(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def greedy(self, prompt: list[int], max_new_tokens: int, eos: set[int] | None = None) -> list[int]:
        """Greedy continuation (argmax of llama.cpp's logits, stopping after an ``eos`` token)."""
        self.prefill(prompt)
        tokens: list[int] = []
        for _ in range(max_new_tokens):
            tokens.append(self.next_token())
            if eos and tokens[-1] in eos or len(tokens) == max_new_tokens:
                break
            self.llm.eval([tokens[-1]])
        return tokens
