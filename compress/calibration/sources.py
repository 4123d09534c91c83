"""Text sources for calibration and evaluation: read text, tokenise it, cut it into windows.

A *text source* is a string:

- ``"general"`` or ``"general:train"``: the calibration mix of the embedded general-domain English
  corpus (``compress/data/general/``, see ``docs/data.md``): the train splits of its mix domains
  and the leading part of the four Austen calibration novels, every part capped at the same size,
  cut into ~2,000-character chunks at paragraph (or sentence) boundaries and interleaved
  round-robin over the parts, joined by a blank line, so that no long run of text is all one domain;
- ``"general:<domain>"`` (or ``"general:<domain>:test"``): that domain's fixed test split;
  ``"general:<domain>:train"``: its train split (an evaluation-only domain has none).
  :func:`general_domains` lists the domains; one of them is kept out of the mix altogether;
- ``"austen"`` or ``"austen:calibration"``: the protocol-v1 calibration split, emma + mansfieldpark +
  prideprejudice + sensesensibility joined by a blank line (``"\\n\\n"``);
- ``"austen:<novel>"``: one of the six embedded novels (``austen:persuasion`` is the main v1
  evaluation text, ``austen:northangerabbey`` the second);
- a path to a ``.txt`` file, a ``.jsonl`` file (one JSON object per line with a ``"text"`` field), or
  a folder holding such files (its direct children, sorted by name, joined by a blank line).
  ``general``, ``austen`` and names starting ``general:`` / ``austen:`` always mean the embedded
  texts, even where a file or folder of that name exists (write ``./general`` for that).

Standard protocol v2 (every figure from now on): calibration windows are
``random_windows(ids, n, 128, seed=0)`` over ``general`` (train splits only); evaluation is, for each
source of ``suite_sources("v2")`` (``austen:persuasion`` for continuity, then the test split of every
``general`` domain, the held-out one included), perplexity over ``sequential_windows(ids, 128,
256)``; report each source's pruned/dense ratio, their geometric mean (the headline) and the worst
source. Protocol v1 (kept for continuity): calibration over ``austen``, evaluation on
``austen:persuasion`` / ``austen:northangerabbey``. Ids carry no special tokens (no BOS), as the
reference figures were measured that way.
"""

from __future__ import annotations

import json
import lzma
import random
import re
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch

from compress.calibration.suites import EVALUATION_SUITES, MIXED_SOURCES
from compress.errors import DataSourceError

AUSTEN_NOVELS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")
CALIBRATION_NOVELS = ("emma", "mansfieldpark", "prideprejudice", "sensesensibility")
AUSTEN_PREFIX = "austen"
DOCUMENT_SEPARATOR = "\n\n"
TEXT_SUFFIXES = (".txt", ".jsonl")

GENERAL_PREFIX = "general"
GENERAL_FOLDER = "general"  # compress/data/general/
GENERAL_MANIFEST = "manifest.json"
GENERAL_SPLITS = ("train", "test")
MIX_CHUNK_CHARS = 2000  # the calibration mix interleaves chunks of about this many characters
AUSTEN_MIX_PART = "austen"  # the mix's Austen part (from the novels above, not a general domain)

_ALLOWED_SOURCES = (
    f"'{GENERAL_PREFIX}' (= '{GENERAL_PREFIX}:train'), '{GENERAL_PREFIX}:<domain>[:train]', "
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
    if source == GENERAL_PREFIX or source.startswith(GENERAL_PREFIX + ":"):
        text = _read_general(source)
    elif source == AUSTEN_PREFIX or source.startswith(AUSTEN_PREFIX + ":"):
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
# The embedded general-domain corpus (compress/data/general/, built by
# scripts/build_general_corpus.py; docs/data.md describes every domain)
# --------------------------------------------------------------------------------------------


def general_manifest() -> dict:
    """The corpus manifest (``compress/data/general/manifest.json``): per domain its source package,
    licence, split rule, sizes and whether it is in the calibration mix."""
    return json.loads(_general_manifest_text())


def general_domains() -> tuple[str, ...]:
    """The domains of the general corpus, in manifest order (each has a test split)."""
    return tuple(general_manifest()["domains"])


def general_mix_domains() -> tuple[str, ...]:
    """The domains whose train split is in the calibration mix (the held-out ones are not)."""
    return tuple(name for name, domain in general_manifest()["domains"].items() if domain["in_mix"])


def general_mix_parts() -> tuple[str, ...]:
    """The parts of the calibration mix in interleaving order: mix domains and ``austen``."""
    return tuple(general_manifest()["mix"]["parts"])


def general_split(domain: str, split: str = "test") -> str:
    """One split (``"test"`` or ``"train"``) of one general domain, as shipped."""
    domains = general_manifest()["domains"]
    if domain not in domains:
        raise DataSourceError(
            f"unknown general-corpus domain '{domain}' in text source '{GENERAL_PREFIX}:{domain}'; "
            f"the domains are {', '.join(domains)} ('{GENERAL_PREFIX}:<domain>' is its test split, "
            f"'{GENERAL_PREFIX}:<domain>:train' its train split, '{GENERAL_PREFIX}' the calibration mix)"
        )
    if split not in GENERAL_SPLITS:
        raise DataSourceError(
            f"unknown split '{split}' in text source '{GENERAL_PREFIX}:{domain}:{split}'; use "
            f"'{GENERAL_PREFIX}:{domain}' (test split) or '{GENERAL_PREFIX}:{domain}:train'"
        )
    entry = domains[domain]["splits"].get(split)
    if entry is None:
        with_train = [name for name, info in domains.items() if "train" in info["splits"]]
        raise DataSourceError(
            f"general-corpus domain '{domain}' is evaluation-only (kept out of the calibration mix) and has "
            f"no train split; use '{GENERAL_PREFIX}:{domain}' (its test split). Domains with a train split: "
            f"{', '.join(with_train)}"
        )
    return _decompress_general(entry["file"])


def general_mix_part(name: str) -> str:
    """The text one part of the calibration mix contributes, before chunking: a mix domain's train
    split, or for ``austen`` the Austen slice (:func:`austen_mix_text`)."""
    if name == AUSTEN_MIX_PART:
        return austen_mix_text()
    if name not in general_mix_domains():
        raise DataSourceError(
            f"'{name}' is not part of the calibration mix; the parts are {', '.join(general_mix_parts())}"
        )
    return general_split(name, "train")


def austen_mix_text() -> str:
    """The mix's Austen part: the leading paragraphs of each calibration novel (emma, mansfieldpark,
    prideprejudice, sensesensibility), each cut at the last blank line within ``train_cap_chars / 4``
    characters, joined by a blank line. None of persuasion / northangerabbey is in it."""
    per_novel = general_manifest()["train_cap_chars"] // len(CALIBRATION_NOVELS)
    slices = []
    for novel in CALIBRATION_NOVELS:
        text = austen_novel(novel)
        end = text.rfind("\n\n", 0, per_novel + 1)
        slices.append(text[: end if end > 0 else per_novel].strip())
    return DOCUMENT_SEPARATOR.join(slices)


def general_mix() -> str:
    """The calibration mix (``read_text("general")``): each part cut into ~MIX_CHUNK_CHARS-character
    chunks (:func:`chunk_text`), then round-robin over the parts in :func:`general_mix_parts` order
    (chunk 0 of every part, chunk 1 of every part, ...; a part that has run out is skipped), joined by
    a blank line."""
    return _general_mix()


def mix_part_texts(source: str) -> dict[str, str]:
    """The parts of a mixed text source, by name, each as the text it contributes to the mix (in
    :func:`general_mix_parts` order): for ``general`` / ``general:train`` the train split of every mix
    domain and the Austen slice. Any other source is one text, not a mix: :class:`DataSourceError`."""
    if source not in MIXED_SOURCES:
        raise DataSourceError(f"text source '{source}' is not a mix of parts; the mixes are {', '.join(MIXED_SOURCES)}")
    return {name: general_mix_part(name) for name in general_mix_parts()}


def chunk_text(text: str, size: int = MIX_CHUNK_CHARS, *, code: bool = False) -> list[str]:
    """Cut ``text`` into chunks of at least ``size`` characters (the last may be shorter).

    A chunk ends at the first paragraph break (a blank line) at or after ``size`` characters; when
    that would make it longer than ``2 * size``, it ends at the first sentence end (for ``code``: the
    first line end) at or after ``size`` characters instead. Each chunk is an exact slice of ``text``;
    only the whitespace at a cut is dropped (for code, the blank lines: indentation is kept).
    """
    blanks = [(m.start(), m.end()) for m in _BLANK_LINE.finditer(text)] + [(len(text), len(text))]
    stops = [(m.start(), m.end()) for m in (_LINE_END if code else _SENTENCE_GAP).finditer(text)]
    chunks, start, b, s = [], 0, 0, 0
    while start < len(text):
        limit = start + size
        while b < len(blanks) and blanks[b][0] < limit:
            b += 1
        cut = blanks[b] if b < len(blanks) else None
        if cut is None or cut[0] > start + 2 * size:
            while s < len(stops) and stops[s][0] < limit:
                s += 1
            if s < len(stops) and (cut is None or stops[s][0] < cut[0]):
                cut = stops[s]
        end, next_start = cut if cut is not None else (len(text), len(text))
        chunk = text[start:end].rstrip()
        chunk = chunk.lstrip("\n") if code else chunk.lstrip()  # code keeps its first line's indent
        if chunk:
            chunks.append(chunk)
        start = next_start
    return chunks


def suite_sources(name: str = "v2") -> list[str]:
    """The text sources of a named evaluation suite (:data:`EVALUATION_SUITES`), in order."""
    if name not in EVALUATION_SUITES:
        raise DataSourceError(f"unknown evaluation suite '{name}'; the suites are {', '.join(EVALUATION_SUITES)}")
    return list(EVALUATION_SUITES[name])


_BLANK_LINE = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)*")  # blank lines, not the next line's indent
_LINE_END = re.compile(r"\n")  # code: a cut between two lines
_SENTENCE_GAP = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')]))\s+(?=[A-Z\"'(])")


def _read_general(source: str) -> str:
    """``general``, ``general:train``, ``general:<domain>``, ``general:<domain>:test|train``."""
    if source in MIXED_SOURCES:
        return general_mix()
    parts = source.split(":")
    if len(parts) == 2 and parts[1]:
        return general_split(parts[1], "test")
    if len(parts) == 3 and parts[1]:
        return general_split(parts[1], parts[2])
    raise DataSourceError(
        f"text source '{source}' is not a general-corpus name; use '{GENERAL_PREFIX}' (the calibration mix), "
        f"'{GENERAL_PREFIX}:<domain>' (test split) or '{GENERAL_PREFIX}:<domain>:train' with <domain> one of "
        f"{', '.join(general_domains())}"
    )


def _general_file(name: str):
    return resources.files("compress").joinpath("data", GENERAL_FOLDER, name)


@lru_cache(maxsize=1)
def _general_manifest_text() -> str:
    packed = _general_file(GENERAL_MANIFEST)
    try:
        return packed.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataSourceError(
            f"the general corpus manifest is missing from the installed package ({packed}); reinstall compress"
        ) from None


@lru_cache(maxsize=32)
def _decompress_general(filename: str) -> str:
    packed = _general_file(filename)
    try:
        return lzma.decompress(packed.read_bytes()).decode("utf-8")
    except FileNotFoundError:
        raise DataSourceError(
            f"the general corpus file '{filename}' is missing from the installed package ({packed}); reinstall compress"
        ) from None


@lru_cache(maxsize=1)
def _general_mix() -> str:
    kinds = {name: info.get("kind", "prose") for name, info in general_manifest()["domains"].items()}
    size = general_manifest()["mix"].get("chunk_chars", MIX_CHUNK_CHARS)
    streams = [
        chunk_text(general_mix_part(part), size, code=kinds.get(part) == "code")
        for part in general_mix_parts()
    ]
    interleaved = [stream[i] for i in range(max(map(len, streams))) for stream in streams if i < len(stream)]
    return DOCUMENT_SEPARATOR.join(interleaved)


# --------------------------------------------------------------------------------------------
# Tokens and windows
# --------------------------------------------------------------------------------------------


TOKENIZE_CHUNK_CHARS = 65536
_CUT = re.compile(r"\S(\s)")  # a whitespace run that follows a non-whitespace character


def text_chunks(text: str, size: int = TOKENIZE_CHUNK_CHARS) -> list[str]:
    """``text`` cut into pieces of about ``size`` characters, each cut placed just before a
    whitespace run that follows a non-whitespace character (never inside a word or a run of
    whitespace); joined, the pieces are ``text``."""
    pieces, start = [], 0
    while start < len(text):
        end = start + size
        if end < len(text):
            match = _CUT.search(text, end)
            end = match.start(1) if match else len(text)
        pieces.append(text[start:end])
        start = end
    return pieces


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False,
                     verbose=False)["input_ids"]


def _chunking_is_exact(tokenizer, pieces: list[str]) -> bool:
    """Whether tokenising piece by piece gives the whole text's ids for this tokenizer, checked on
    the first cuts (byte-level BPE pre-tokenisers never join a word to the whitespace before it;
    SentencePiece tokenizers that add a prefix space at every call do, and are tokenised whole)."""
    for left, right in zip(pieces[:3], pieces[1:4]):
        tail, head = left[-2000:], right[:2000]
        if _encode(tokenizer, tail + head) != _encode(tokenizer, tail) + _encode(tokenizer, head):
            return False
    return True


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """The token ids of ``text`` as one LongTensor [N], with no special tokens (no BOS/EOS).

    The ids are those of tokenising the whole text in one call. Long texts are tokenised in pieces
    cut before whitespace runs (:func:`text_chunks`) when the tokenizer gives the same ids that way
    (checked on the first cuts; the pieces are faster and need a fraction of the memory of one
    multi-megabyte call), else in one call. ``verbose=False`` silences the "sequence longer than
    the model's maximum" warning: the windows cut later are short.
    """
    pieces = text_chunks(text)
    if len(pieces) > 1 and _chunking_is_exact(tokenizer, pieces):
        ids = torch.tensor([i for piece in pieces for i in _encode(tokenizer, piece)], dtype=torch.long)
    else:
        ids = torch.tensor(_encode(tokenizer, text), dtype=torch.long)
    if ids.numel() == 0:
        raise DataSourceError("the text tokenises to no tokens at all; give a source with some text in it")
    return ids


def window_bos(tokenizer) -> int | None:
    """The BOS id every window starts with for this tokenizer's model: its ``bos_token_id`` when the
    tokenizer puts BOS before a text it encodes (Gemma, Llama 3: their models expect it, and are
    far worse without it), else None (SmolLM2, Qwen: windows are plain text)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if not isinstance(bos, int) or not callable(tokenizer):
        return None
    try:
        ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    except Exception:  # a processor or tokenizer that cannot encode a bare string adds nothing here
        return None
    return bos if len(ids) > 0 and ids[0] == bos else None


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The token ids of a generation prompt: the text's ids, after BOS when the model expects one
    (:func:`window_bos`); a model that always sees BOS in front of text is lost without it."""
    ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    bos = window_bos(tokenizer)
    return [bos] + ids if bos is not None else ids


def _prepend(windows: torch.Tensor, bos: int | None) -> torch.Tensor:
    """``windows`` [n, L] with a BOS column in front ([n, L + 1]); unchanged when ``bos`` is None."""
    if bos is None:
        return windows
    return torch.cat([torch.full((windows.shape[0], 1), bos, dtype=windows.dtype), windows], dim=1)


def random_windows(ids: torch.Tensor, n: int, seqlen: int, seed: int, *, source: str | None = None,
                   field: str | None = None, bos: int | None = None) -> torch.Tensor:
    """``n`` windows of ``seqlen`` tokens at random starts: LongTensor [n, seqlen].

    The standard protocol: a private ``random.Random(seed)`` (the global random state is left
    alone) draws each start as ``randint(0, N - seqlen - 1)`` in turn, and the window is
    ``ids[start:start + seqlen]``. Windows may overlap. ``source`` and ``field`` (the recipe
    section, e.g. ``calibration``) only name the text in errors. With ``bos`` (see
    :func:`window_bos`) each window is BOS followed by ``seqlen - 1`` text tokens.
    """
    ids = _as_token_ids(ids)
    _check_positive(n=n, seqlen=seqlen)
    if bos is not None and seqlen > 1:
        return _prepend(random_windows(ids, n, seqlen - 1, seed, source=source, field=field), bos)
    available = ids.numel()
    if available < seqlen + 1:
        raise DataSourceError(
            f"{_describe(source, field)} has {available} tokens, too few for random {seqlen}-token windows "
            f"(at least {seqlen + 1} needed); use a longer text or a smaller {_seqlen_field(field)}"
        )
    rng = random.Random(seed)
    starts = [rng.randint(0, available - seqlen - 1) for _ in range(n)]
    return torch.stack([ids[start : start + seqlen] for start in starts])


def sequential_windows(
    ids: torch.Tensor, seqlen: int, max_windows: int | None, *, source: str | None = None, field: str | None = None,
    bos: int | None = None,
) -> torch.Tensor:
    """Non-overlapping windows of ``seqlen`` tokens from the start: LongTensor [w, seqlen].

    ``w = min(N // seqlen, max_windows)`` (``max_windows=None``: all whole windows); the tail that
    does not fill a window is dropped. ``source`` only names the text in errors. With ``bos`` (see
    :func:`window_bos`) each window is BOS followed by the next ``seqlen - 1`` text tokens.
    """
    ids = _as_token_ids(ids)
    _check_positive(seqlen=seqlen)
    if bos is not None and seqlen > 1:
        return _prepend(sequential_windows(ids, seqlen - 1, max_windows, source=source, field=field), bos)
    whole_windows = ids.numel() // seqlen
    if max_windows is not None:
        _check_positive(max_windows=max_windows)
        whole_windows = min(whole_windows, max_windows)
    if whole_windows == 0:
        raise DataSourceError(
            f"{_describe(source, field)} has {ids.numel()} tokens, fewer than one {seqlen}-token window; "
            f"use a longer text or a smaller {_seqlen_field(field)}"
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


def _describe(source: str | None, field: str | None = None) -> str:
    """``calibration.source: text source 'x.txt'`` (the parts that are known)."""
    text = f"text source '{source}'" if source else "the text"
    return f"{field}.source: {text}" if field else text


def _seqlen_field(field: str | None) -> str:
    return f"{field}.seqlen" if field else "sequence length"


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
