"""Text sources for calibration and evaluation: read text, tokenise it, cut it into windows.

A *text source* is a string:

- ``"austen"`` or ``"austen:calibration"``: the standard calibration split, emma + mansfieldpark +
  prideprejudice + sensesensibility joined by a blank line (``"\\n\\n"``);
- ``"austen:<novel>"``: one of the six embedded novels (``austen:persuasion`` is the main
  evaluation text, ``austen:northangerabbey`` the second);
- a path to a ``.txt`` file, a ``.jsonl`` file (one JSON object per line with a ``"text"`` field), or
  a folder holding such files (its direct children, sorted by name, joined by a blank line).

The standard protocol, used for every figure we report: calibration windows are
``random_windows(ids, n, 128, seed=0)`` over ``austen``; evaluation windows are
``sequential_windows(ids, 128, 256)`` over ``austen:persuasion`` / ``austen:northangerabbey``. Ids
carry no special tokens (no BOS), as the reference figures were measured that way.
"""

from __future__ import annotations

import json
import lzma
import random
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch

from compress.errors import DataSourceError

AUSTEN_NOVELS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")
CALIBRATION_NOVELS = ("emma", "mansfieldpark", "prideprejudice", "sensesensibility")
AUSTEN_PREFIX = "austen"
DOCUMENT_SEPARATOR = "\n\n"
TEXT_SUFFIXES = (".txt", ".jsonl")

_ALLOWED_SOURCES = (
    f"'{AUSTEN_PREFIX}' (= '{AUSTEN_PREFIX}:calibration'), "
    f"'{AUSTEN_PREFIX}:<novel>' with <novel> one of {', '.join(AUSTEN_NOVELS)}, "
    "or a path to a .txt file, a .jsonl file (field \"text\") or a folder of those"
)


# --------------------------------------------------------------------------------------------
# Reading text
# --------------------------------------------------------------------------------------------


def read_text(source: str) -> str:
    """The text a source names (see the module docstring). Raises DataSourceError if it is unknown,
    missing, unreadable or empty."""
    if source == AUSTEN_PREFIX or source.startswith(AUSTEN_PREFIX + ":"):
        text = _read_austen(source)
    else:
        text = _read_path(source)
    if not text.strip():
        raise DataSourceError(f"text source '{source}' is empty; give a source with some text in it")
    return text


def austen_novel(name: str) -> str:
    """One embedded novel, e.g. ``austen_novel("persuasion")``, as it was shipped (plain ASCII)."""
    if name not in AUSTEN_NOVELS:
        raise DataSourceError(
            f"unknown novel '{name}' in text source '{AUSTEN_PREFIX}:{name}'; "
            f"the embedded novels are {', '.join(AUSTEN_NOVELS)} (or '{AUSTEN_PREFIX}:calibration')"
        )
    return _decompress_novel(name)


@lru_cache(maxsize=len(AUSTEN_NOVELS))
def _decompress_novel(name: str) -> str:
    packed = resources.files("compress").joinpath("data", f"{name}.txt.xz")
    try:
        return lzma.decompress(packed.read_bytes()).decode("utf-8")
    except FileNotFoundError:
        raise DataSourceError(
            f"the embedded novel '{name}' is missing from the installed package ({packed}); reinstall compress"
        ) from None


def _read_austen(source: str) -> str:
    """``austen``, ``austen:calibration`` or ``austen:<novel>``."""
    _, _, name = source.partition(":")
    if name in ("", "calibration"):
        return DOCUMENT_SEPARATOR.join(austen_novel(novel) for novel in CALIBRATION_NOVELS)
    return austen_novel(name)


def _read_path(source: str) -> str:
    """A .txt / .jsonl file, or a folder of them."""
    path = Path(source).expanduser()
    if path.is_dir():
        return _read_folder(path, source)
    if path.is_file():
        return _read_file(path, source)
    raise DataSourceError(f"text source '{source}' not found; expected {_ALLOWED_SOURCES}")


def _read_folder(folder: Path, source: str) -> str:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in TEXT_SUFFIXES)
    if not files:
        raise DataSourceError(f"folder '{source}' holds no .txt or .jsonl files; a text folder needs at least one")
    return DOCUMENT_SEPARATOR.join(_read_file(p, str(p)) for p in files)


def _read_file(path: Path, source: str) -> str:
    if path.suffix == ".txt":
        return _decode(path, source)
    if path.suffix == ".jsonl":
        return _read_jsonl(path, source)
    raise DataSourceError(
        f"text file '{source}' has suffix '{path.suffix}'; only .txt and .jsonl (field \"text\") are read"
    )


def _decode(path: Path, source: str) -> str:
    """A file's text as UTF-8 (universal newlines, so CRLF reads as LF)."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataSourceError(f"text file '{source}' is not valid UTF-8 ({error})") from None
    except OSError as error:
        raise DataSourceError(f"cannot read text file '{source}': {error.strerror or error}") from None


def _read_jsonl(path: Path, source: str) -> str:
    """The ``"text"`` fields of a JSON-lines file, in file order, joined by a blank line."""
    documents = []
    for line_number, line in enumerate(_decode(path, source).splitlines(), start=1):
        if line.strip():
            documents.append(_jsonl_text(line, line_number, source))
    return DOCUMENT_SEPARATOR.join(documents)


def _jsonl_text(line: str, line_number: int, source: str) -> str:
    where = f"'{source}' line {line_number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise DataSourceError(f"{where} is not valid JSON ({error.msg})") from None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise DataSourceError(f"{where} needs a JSON object with a string field \"text\"")
    return record["text"]


# --------------------------------------------------------------------------------------------
# Tokens and windows
# --------------------------------------------------------------------------------------------


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """The token ids of ``text`` as one LongTensor [N], with no special tokens (no BOS/EOS).

    The whole text goes to the tokenizer in one call, so the ids are exactly those of tokenising
    the whole text (splitting it, even at paragraphs, can change the tokens at the cut for BPE
    tokenizers whose pre-tokenizer groups runs of whitespace). ``verbose=False`` silences the
    "sequence longer than the model's maximum" warning: the windows cut later are short.
    """
    encoded = tokenizer(
        text,
        add_special_tokens=False,
        return_attention_mask=False,
        return_token_type_ids=False,
        verbose=False,
    )
    ids = torch.tensor(encoded["input_ids"], dtype=torch.long)
    if ids.numel() == 0:
        raise DataSourceError("the text tokenises to no tokens at all; give a source with some text in it")
    return ids


def random_windows(ids: torch.Tensor, n: int, seqlen: int, seed: int, *, source: str | None = None) -> torch.Tensor:
    """``n`` windows of ``seqlen`` tokens at random starts: LongTensor [n, seqlen].

    The standard protocol: a private ``random.Random(seed)`` (the global random state is left
    alone) draws each start as ``randint(0, N - seqlen - 1)`` in turn, and the window is
    ``ids[start:start + seqlen]``. Windows may overlap. ``source`` only names the text in errors.
    """
    ids = _as_token_ids(ids)
    _check_positive(n=n, seqlen=seqlen)
    available = ids.numel()
    if available < seqlen + 1:
        raise DataSourceError(
            f"{_describe(source)} has {available} tokens, too few for random {seqlen}-token windows "
            f"(at least {seqlen + 1} needed); use a longer text or a smaller sequence length"
        )
    rng = random.Random(seed)
    starts = [rng.randint(0, available - seqlen - 1) for _ in range(n)]
    return torch.stack([ids[start : start + seqlen] for start in starts])


def sequential_windows(
    ids: torch.Tensor, seqlen: int, max_windows: int | None, *, source: str | None = None
) -> torch.Tensor:
    """Non-overlapping windows of ``seqlen`` tokens from the start: LongTensor [w, seqlen].

    ``w = min(N // seqlen, max_windows)`` (``max_windows=None``: all whole windows); the tail that
    does not fill a window is dropped. ``source`` only names the text in errors.
    """
    ids = _as_token_ids(ids)
    _check_positive(seqlen=seqlen)
    whole_windows = ids.numel() // seqlen
    if max_windows is not None:
        _check_positive(max_windows=max_windows)
        whole_windows = min(whole_windows, max_windows)
    if whole_windows == 0:
        raise DataSourceError(
            f"{_describe(source)} has {ids.numel()} tokens, fewer than one {seqlen}-token window; "
            "use a longer text or a smaller sequence length"
        )
    return ids[: whole_windows * seqlen].reshape(whole_windows, seqlen).clone()


def _as_token_ids(ids) -> torch.Tensor:
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.dim() != 1:
        raise ValueError(f"token ids must be one flat sequence [N], got shape {tuple(ids.shape)}")
    return ids


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise DataSourceError(f"{name} must be a whole number of at least 1, got {value!r}")


def _describe(source: str | None) -> str:
    return f"text source '{source}'" if source else "the text"


# --------------------------------------------------------------------------------------------
# Sentences (for sentence encoders)
# --------------------------------------------------------------------------------------------


def split_sentences(text: str, min_words: int = 6) -> list[str]:
    """Sentences of ``text`` (split after . ! ?, whitespace normalised) with at least ``min_words`` words."""
    import re

    flat = re.sub(r"\s+", " ", text)
    sentences = (s.strip() for s in re.split(r"(?<=[.!?])\s+", flat))
    return [s for s in sentences if len(s.split()) >= min_words]


def first_sentences(source: str, count: int, min_words: int = 6) -> list[str]:
    """The first ``count`` sentences of a text source (the held-out evaluation protocol)."""
    return split_sentences(read_text(source), min_words)[:count]


def random_sentences(source: str, count: int, seed: int, min_words: int = 6) -> list[str]:
    """``count`` sentences drawn without replacement from a text source, ``random.Random(seed)``,
    in the order drawn (calibration)."""
    sentences = split_sentences(read_text(source), min_words)
    if count > len(sentences):
        raise DataSourceError(f"{_describe(source)} has {len(sentences)} sentences of ≥{min_words} words; {count} asked for")
    return random.Random(seed).sample(sentences, count)
