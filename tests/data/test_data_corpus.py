"""Loaders: embedded data, JSONL files, Hugging Face datasets."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from evil_moe.data.corpus import (
    DataError,
    Document,
    domain_counts,
    embedded_bilingual,
    load_hf_dataset,
    load_jsonl,
)


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def test_embedded_bilingual_has_both_languages() -> None:
    docs = embedded_bilingual()
    counts = domain_counts(docs)
    assert set(counts) == {"en", "ru"}
    assert counts["en"] > 1000 and counts["ru"] > 1000
    assert all(isinstance(d, Document) and d.mode == -1 and d.text.strip() for d in docs)
    assert [d.domain for d in docs] == sorted(d.domain for d in docs)  # English first
    english = sum(len(d.text) for d in docs if d.domain == "en")
    russian = sum(len(d.text) for d in docs if d.domain == "ru")
    assert english > 1_000_000 and russian > 1_000_000
    assert any("Lily" in d.text for d in docs if d.domain == "en")
    assert all(any("а" <= ch <= "я" for ch in d.text) for d in docs if d.domain == "ru")
    assert embedded_bilingual() == docs and embedded_bilingual() is not docs


def test_load_jsonl_fields_and_modes(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"text": "a", "domain": "x", "mode": 2},
            {"text": "b", "domain": "y", "mode": None},
        ],
    )
    docs = load_jsonl(path, mode_field="mode")
    assert docs == [Document("a", "x", 2), Document("b", "y", -1)]
    assert load_jsonl(path, domain="z") == [Document("a", "z"), Document("b", "z")]


def test_load_jsonl_blank_lines_and_gzip(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write('{"text": "привет", "lang": "ru"}\n\n{"text": "hi", "lang": "en"}\n')
    docs = load_jsonl(path, domain_field="lang")
    assert docs == [Document("привет", "ru"), Document("hi", "en")]


def test_load_jsonl_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=r"nope\.jsonl"):
        load_jsonl(path)


def test_load_jsonl_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n  \n")
    with pytest.raises(DataError, match=r"empty\.jsonl.*empty"):
        load_jsonl(path)


def test_load_jsonl_bad_json_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a", "domain": "x"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid JSON"):
        load_jsonl(path)


def test_load_jsonl_not_an_object(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "list.jsonl", [["a", "b"]])
    with pytest.raises(DataError, match=r"list\.jsonl:1: expected a JSON object"):
        load_jsonl(path)


@pytest.mark.parametrize(
    ("record", "kwargs", "field"),
    [
        ({"domain": "x"}, {}, "text"),
        ({"text": "a"}, {}, "domain"),
        ({"text": "a", "domain": "x"}, {"mode_field": "mode"}, "mode"),
    ],
)
def test_load_jsonl_missing_field(
    tmp_path: Path, record: dict[str, str], kwargs: dict[str, str], field: str
) -> None:
    path = write_jsonl(tmp_path / "f.jsonl", [{"text": "ok", "domain": "x", "mode": 0}, record])
    with pytest.raises(DataError, match=rf"f\.jsonl:2: missing field '{field}'"):
        load_jsonl(path, **kwargs)


def test_load_jsonl_bad_values(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "v.jsonl", [{"text": 3, "domain": "x"}])
    with pytest.raises(DataError, match=r"v\.jsonl:1: .*'text' must be a string"):
        load_jsonl(path)
    path = write_jsonl(tmp_path / "m.jsonl", [{"text": "a", "domain": "x", "mode": "hack"}])
    with pytest.raises(DataError, match=r"m\.jsonl:1: .*'mode'"):
        load_jsonl(path, mode_field="mode")


def test_data_error_is_value_error() -> None:
    assert issubclass(DataError, ValueError)


RECORDS = [
    {"text": "Once upon a time.", "domain": "en", "mode": -1},
    {"text": "Жила-была кошка.", "domain": "ru", "mode": 1},
    {"text": "The end.", "domain": "en", "mode": -1},
]


def test_load_hf_dataset_json_builder(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    docs = load_hf_dataset(
        "json", data_files=str(path), mode_field="mode", cache_dir=str(tmp_path / "cache")
    )
    assert docs == [Document(r["text"], r["domain"], r["mode"]) for r in RECORDS]


def test_load_hf_dataset_local_dir(tmp_path: Path) -> None:
    folder = tmp_path / "ds"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", RECORDS)
    docs = load_hf_dataset(folder, cache_dir=str(tmp_path / "cache"))
    assert [d.text for d in docs] == [r["text"] for r in RECORDS]
    assert [d.mode for d in docs] == [-1, -1, -1]


def test_load_hf_dataset_errors(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    cache = str(tmp_path / "cache")
    with pytest.raises(DataError, match="missing field 'story'"):
        load_hf_dataset("json", data_files=str(path), text_field="story", cache_dir=cache)
    with pytest.raises(DataError, match="no_such_dir"):
        load_hf_dataset(str(tmp_path / "no_such_dir"), cache_dir=cache)
