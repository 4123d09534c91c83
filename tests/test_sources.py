"""Text sources, tokenisation and windows (model-free apart from a tiny word-level tokenizer)."""

from __future__ import annotations

import json
import random

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from compress.calibration.sources import (
    AUSTEN_NOVELS,
    austen_novel,
    random_windows,
    read_text,
    sequential_windows,
    tokenize_text,
)
from compress.errors import DataSourceError

SHARED_AUSTEN = "/work/shared/data/austen"


@pytest.fixture
def word_tokenizer():
    """Word-level tokenizer over w0..w126 plus [UNK] (id 127), with a BOS token it must not add."""
    vocab = {f"w{i}": i for i in range(126)} | {"<s>": 126, "[UNK]": 127}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", bos_token="<s>", model_max_length=4)


# ---------------------------------------------------------------------------------- read_text


def test_embedded_novels_are_the_shared_texts():
    for novel in AUSTEN_NOVELS:
        text = read_text(f"austen:{novel}")
        with open(f"{SHARED_AUSTEN}/{novel}.txt", encoding="utf-8") as handle:
            assert text == handle.read()


def test_austen_is_the_calibration_split():
    expected = "\n\n".join(austen_novel(n) for n in ("emma", "mansfieldpark", "prideprejudice", "sensesensibility"))
    assert read_text("austen") == expected
    assert read_text("austen:calibration") == expected
    assert austen_novel("persuasion")[2000:4000] not in expected  # no evaluation text in calibration


def test_unknown_novel_names_the_allowed_ones():
    with pytest.raises(DataSourceError, match="austen:middlemarch.*persuasion"):
        read_text("austen:middlemarch")


def test_txt_file(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"first line\r\nsecond line\n")
    assert read_text(str(path)) == "first line\nsecond line\n"


def test_jsonl_file_joins_text_fields(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two", "id": 2}) + "\n")
    assert read_text(str(path)) == "one\n\ntwo"


@pytest.mark.parametrize("line", ["{not json", json.dumps({"body": "x"}), json.dumps(["text"])])
def test_bad_jsonl_line_is_named(tmp_path, line):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n" + line + "\n")
    with pytest.raises(DataSourceError, match="bad.jsonl' line 2"):
        read_text(str(path))


def test_folder_reads_txt_and_jsonl_sorted(tmp_path):
    (tmp_path / "b.txt").write_text("bee")
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "ay"}) + "\n")
    (tmp_path / "notes.md").write_text("ignored")
    assert read_text(str(tmp_path)) == "ay\n\nbee"


def test_folder_without_text_files(tmp_path):
    (tmp_path / "notes.md").write_text("ignored")
    with pytest.raises(DataSourceError, match=r"no \.txt or \.jsonl"):
        read_text(str(tmp_path))


def test_missing_path_lists_what_is_allowed(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(DataSourceError, match="nope.txt' not found.*austen:<novel>"):
        read_text(str(missing))


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("a,b")
    with pytest.raises(DataSourceError, match=r"data.csv.*only \.txt and \.jsonl"):
        read_text(str(path))


def test_empty_text_is_refused(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("  \n\n")
    with pytest.raises(DataSourceError, match="empty.txt' is empty"):
        read_text(str(path))


def test_non_utf8_file(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes("caf\u00e9".encode("latin-1"))
    with pytest.raises(DataSourceError, match="not valid UTF-8"):
        read_text(str(path))


# ------------------------------------------------------------------------------ tokenize_text


def test_tokenize_adds_no_special_tokens_and_ignores_max_length(word_tokenizer, caplog):
    ids = tokenize_text(word_tokenizer, "w5 w6 w7 w8 w9 w10")
    assert ids.dtype == torch.long and ids.tolist() == [5, 6, 7, 8, 9, 10]
    assert "longer than the specified maximum" not in caplog.text


def test_tokenize_equals_tokenizing_the_whole_text(word_tokenizer):
    text = "w1 w2\n\nw3 zz w4"
    assert tokenize_text(word_tokenizer, text).tolist() == word_tokenizer(text, add_special_tokens=False)["input_ids"]


def test_tokenize_empty_result(word_tokenizer):
    with pytest.raises(DataSourceError, match="no tokens"):
        tokenize_text(word_tokenizer, "   ")


# ---------------------------------------------------------------------------------- windows


def test_random_windows_follow_the_standard_protocol():
    ids = torch.arange(1000)
    windows = random_windows(ids, n=5, seqlen=16, seed=3)
    rng = random.Random(3)
    starts = [rng.randint(0, 1000 - 16 - 1) for _ in range(5)]
    assert windows.shape == (5, 16)
    assert windows.tolist() == [list(range(s, s + 16)) for s in starts]


def test_random_windows_leave_the_global_random_state_alone():
    random.seed(123)
    expected = random.random()
    random.seed(123)
    random_windows(torch.arange(100), n=4, seqlen=8, seed=0)
    assert random.random() == expected


def test_random_windows_need_seqlen_plus_one_tokens():
    assert random_windows(torch.arange(9), n=2, seqlen=8, seed=0).tolist() == [list(range(8))] * 2
    with pytest.raises(DataSourceError, match="'austen:x' has 8 tokens.*at least 9"):
        random_windows(torch.arange(8), n=1, seqlen=8, seed=0, source="austen:x")


def test_sequential_windows_are_non_overlapping_from_the_start():
    ids = torch.arange(50)
    assert sequential_windows(ids, 8, 3).tolist() == [list(range(0, 8)), list(range(8, 16)), list(range(16, 24))]
    assert sequential_windows(ids, 8, 100).shape == (6, 8)
    assert sequential_windows(ids, 8, None).shape == (6, 8)


def test_sequential_windows_too_short():
    with pytest.raises(DataSourceError, match="has 5 tokens, fewer than one 8-token window"):
        sequential_windows(torch.arange(5), 8, 4)


@pytest.mark.parametrize("bad", [0, -1])
def test_window_sizes_must_be_positive(bad):
    with pytest.raises(DataSourceError, match="at least 1"):
        random_windows(torch.arange(100), n=bad, seqlen=8, seed=0)
    with pytest.raises(DataSourceError, match="at least 1"):
        sequential_windows(torch.arange(100), bad, 4)
