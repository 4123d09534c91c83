"""Token ids of text sources, cached on disk by tokenizer and text.

Tokenising the general calibration mix takes seconds and evaluation texts are read on every run;
the ids are kept in ``<cache>/tokens/<key>.npy``, the key a hash of the tokenizer's full
definition and of the text itself, so an edited file or another tokenizer never hits a stale entry.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from compress.cache import cache_root, digest, write_atomically
from compress.calibration.sources import mix_part_texts, read_text, tokenize_text

TOKENS_FOLDER = "tokens"


def tokenizer_fingerprint(tokenizer) -> str | None:
    """A hash of everything that decides the ids: the fast tokenizer's JSON definition (or, for a
    slow tokenizer, its vocabulary) and its class; None for a tokenizer that exposes neither."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return digest(backend.to_str(), type(tokenizer).__name__)
    if hasattr(tokenizer, "get_vocab"):
        return digest(json.dumps(sorted(tokenizer.get_vocab().items())), type(tokenizer).__name__)
    return None


def source_ids(tokenizer, source: str, *, cache: bool = True) -> torch.Tensor:
    """The token ids LongTensor [N] of text source ``source`` (see
    :func:`compress.calibration.sources.read_text`), from the cache when it holds them."""
    return text_ids(tokenizer, read_text(source), cache=cache)


def mix_part_ids(tokenizer, source: str, *, cache: bool = True) -> dict[str, torch.Tensor]:
    """The token ids [N_part] of each part of the mixed source ``source``
    (:func:`compress.calibration.sources.mix_part_texts`), by part name, cached as :func:`source_ids`."""
    return {name: text_ids(tokenizer, text, cache=cache) for name, text in mix_part_texts(source).items()}


def text_ids(tokenizer, text: str, *, cache: bool = True) -> torch.Tensor:
    """The token ids LongTensor [N] of ``text``, from the cache when it holds them."""
    fingerprint = tokenizer_fingerprint(tokenizer) if cache else None
    if fingerprint is None:
        return tokenize_text(tokenizer, text)
    path = cache_root() / TOKENS_FOLDER / f"{digest(fingerprint, text)}.npy"
    try:
        return torch.from_numpy(np.load(path).astype(np.int64))
    except (OSError, ValueError):
        pass
    ids = tokenize_text(tokenizer, text)

    def save(tmp):
        with open(tmp, "wb") as handle:
            np.save(handle, ids.numpy().astype(np.int32))

    write_atomically(path, save)
    return ids
