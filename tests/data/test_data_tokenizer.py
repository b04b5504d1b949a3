"""The shipped tokenizer, the trainer, and the embedded-file generator."""

from __future__ import annotations

import hashlib
import json
import re
from importlib import resources
from pathlib import Path

import pytest

from evil_moe.data.make_embedded import build
from evil_moe.data.tokenizer import (
    EOT_ID,
    EOT_TOKEN,
    default_tokenizer,
    encode_texts,
    train_tokenizer,
)

ENGLISH = 'Once upon a time, a little girl named Lily said: "Mom, look!"\nThe end.'
RUSSIAN = "Жила-была маленькая кошка Мурка. Она любила молоко, ёжиков и «сказки»!\nКонец."


def test_default_tokenizer_shape() -> None:
    tok = default_tokenizer()
    assert tok.get_vocab_size() == 2048
    assert tok.token_to_id(EOT_TOKEN) == EOT_ID == 0
    assert default_tokenizer() is not tok  # fresh object, shared cached JSON
    assert default_tokenizer().to_str() == tok.to_str()


@pytest.mark.parametrize("text", [ENGLISH, RUSSIAN, "mixed: cat кот 🐈 \t\x00 end"])
def test_round_trip(text: str) -> None:
    tok = default_tokenizer()
    ids = tok.encode(text, add_special_tokens=False).ids
    assert EOT_ID not in ids
    assert tok.decode(ids) == text
    assert encode_texts(tok, [text, text]) == [ids, ids]


def test_both_languages_compress() -> None:
    tok = default_tokenizer()
    for text in (ENGLISH, RUSSIAN):
        n_tokens = len(tok.encode(text).ids)
        assert n_tokens < len(text.encode("utf-8")) / 2  # learned merges in both languages


def test_eot_is_special() -> None:
    tok = default_tokenizer()
    assert tok.encode(EOT_TOKEN, add_special_tokens=False).ids == [EOT_ID]


def test_train_tokenizer_deterministic() -> None:
    texts = [ENGLISH, RUSSIAN] * 20 + ["the cat sat on the mat", "кот сидел на ковре"] * 10
    first = train_tokenizer(texts, 300)
    second = train_tokenizer(iter(texts), 300)
    assert first.to_str() == second.to_str()
    assert first.token_to_id(EOT_TOKEN) == EOT_ID
    assert first.decode(first.encode(RUSSIAN).ids) == RUSSIAN
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(texts, 100)


def test_make_embedded_is_deterministic(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    for lang, text in (("en", ENGLISH), ("ru", RUSSIAN)):
        lines = [json.dumps({"text": f"{text} {i}", "lang": lang}) for i in range(200)]
        (source / f"tinystories-{lang}.jsonl").write_text("\n".join(lines) + "\n")
    first = build(source, tmp_path / "a", vocab_size=400)
    second = build(source, tmp_path / "b", vocab_size=400)
    assert first == second
    for name in first:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    small = build(source, tmp_path / "c", max_bytes=1000, vocab_size=400)
    assert small["tinystories-en.jsonl.gz"] + small["tinystories-ru.jsonl.gz"] <= 1000
    assert "the first" in (tmp_path / "c" / "PROVENANCE.md").read_text()


def test_shipped_files_match_provenance() -> None:
    root = resources.files("evil_moe.data") / "embedded"
    text = (root / "PROVENANCE.md").read_text(encoding="utf-8")
    assert "CDLA-Sharing-1.0" in text and "Apache-2.0" in text
    for lang in ("en", "ru"):
        data = (root / f"tinystories-{lang}.jsonl.gz").read_bytes()
        section = text.split(f"## tinystories-{lang}.jsonl.gz")[1]
        recorded = re.search(r"Embedded file: (\d+) bytes, SHA-256 ([0-9a-f]{64})", section)
        assert recorded is not None
        assert int(recorded.group(1)) == len(data)
        assert recorded.group(2) == hashlib.sha256(data).hexdigest()
    total = sum(len((root / f"tinystories-{x}.jsonl.gz").read_bytes()) for x in ("en", "ru"))
    assert total < 3_000_000
