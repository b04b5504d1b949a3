"""Documents and the loaders that produce them: JSONL files, Hugging Face datasets, and the
embedded bilingual TinyStories sample (English = retain domain, Russian = forget domain)."""

from __future__ import annotations

import gzip
import json
import lzma
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import IO, Any

#: Embedded files (in ``evil_moe/data/embedded/``) per domain of :func:`embedded_bilingual`.
EMBEDDED_FILES = {"en": "tinystories-en.jsonl.gz", "ru": "tinystories-ru.jsonl.gz"}
#: The retain and forget domains of the embedded bilingual data.
BILINGUAL_RETAIN_DOMAIN = "en"
BILINGUAL_FORGET_DOMAIN = "ru"


class DataError(ValueError):
    """Unusable input data (missing file, bad record, missing field...)."""


@dataclass(frozen=True)
class Document:
    """One text document, its domain, and its forget mode (``-1`` = none)."""

    text: str
    domain: str
    mode: int = -1


def _open_text(path: Path) -> IO[str]:
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    if name.endswith(".xz"):
        return lzma.open(path, "rt", encoding="utf-8")
    return path.open("r", encoding="utf-8")


def _make_document(
    record: Mapping[str, Any],
    text_field: str,
    domain_field: str | None,
    mode_field: str | None,
    domain: str | None,
    where: str,
) -> Document:
    """Build one document from a record; ``where`` names the record in error messages."""
    if text_field not in record:
        raise DataError(f"{where}: missing field {text_field!r} (fields: {sorted(record)})")
    text = record[text_field]
    if not isinstance(text, str):
        raise DataError(
            f"{where}: field {text_field!r} must be a string, got {type(text).__name__}"
        )
    if domain is None:
        if domain_field is None or domain_field not in record:
            raise DataError(
                f"{where}: missing field {domain_field!r} (fields: {sorted(record)}); "
                "pass domain=... to give every document the same domain"
            )
        dom = record[domain_field]
        if not isinstance(dom, str | int) or isinstance(dom, bool) or dom == "":
            raise DataError(f"{where}: field {domain_field!r} must be a non-empty string")
        domain = str(dom)
    mode = -1
    if mode_field is not None:
        if mode_field not in record:
            raise DataError(f"{where}: missing field {mode_field!r} (fields: {sorted(record)})")
        raw = record[mode_field]
        if raw is not None:
            if isinstance(raw, bool) or not isinstance(raw, int) or raw < -1:
                raise DataError(
                    f"{where}: field {mode_field!r} must be an integer >= -1 or null, got {raw!r}"
                )
            mode = raw
    return Document(text=text, domain=domain, mode=mode)


def load_jsonl(
    path: str | os.PathLike[str],
    text_field: str = "text",
    domain_field: str = "domain",
    mode_field: str | None = None,
    *,
    domain: str | None = None,
) -> list[Document]:
    """Load documents from a JSON-lines file (one object per line; ``.gz``/``.xz`` allowed).

    ``domain`` (if given) is used for every document instead of ``domain_field``. A
    ``mode_field`` value must be an integer >= -1 or null (= no mode). Blank lines are
    skipped. Raises :class:`DataError` naming the file and line on any problem.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    docs: list[Document] = []
    try:
        with _open_text(path) as handle:
            for lineno, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{where}: invalid JSON ({exc.msg})") from exc
                if not isinstance(record, dict):
                    raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
                docs.append(
                    _make_document(record, text_field, domain_field, mode_field, domain, where)
                )
    except (OSError, UnicodeDecodeError, EOFError, lzma.LZMAError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from exc
    if not docs:
        raise DataError(f"{path}: no records (empty file)")
    return docs


def load_hf_dataset(
    path_or_name: str | os.PathLike[str],
    split: str = "train",
    text_field: str = "text",
    domain_field: str = "domain",
    mode_field: str | None = None,
    *,
    domain: str | None = None,
    **load_kwargs: Any,
) -> list[Document]:
    """Load documents with ``datasets.load_dataset(path_or_name, split=split, **load_kwargs)``.

    ``path_or_name`` is a hub name, a local dataset directory, or a builder such as
    ``"json"`` with ``data_files=...``. Field handling is that of :func:`load_jsonl`.
    Requires the optional ``datasets`` package (``pip install evil-moe[hf]``).
    """
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise DataError(
            "loading a Hugging Face dataset needs the 'datasets' package "
            "(pip install 'evil-moe[hf]')"
        ) from exc
    name = os.fspath(path_or_name)
    looks_local = not isinstance(path_or_name, str) or name.startswith(("/", "./", "../", "~"))
    if looks_local and not Path(name).expanduser().exists():
        raise DataError(f"{name}: no such file or directory")
    try:
        dataset = datasets.load_dataset(name, split=split, **load_kwargs)
    except Exception as exc:  # datasets raises many unrelated exception types
        raise DataError(f"{name}: cannot load dataset split {split!r} ({exc})") from exc
    if not isinstance(dataset, datasets.Dataset):
        raise DataError(f"{name}: expected a map-style Dataset, got {type(dataset).__name__}")
    if len(dataset) == 0:
        raise DataError(f"{name}: split {split!r} has no records")
    columns = set(dataset.column_names)
    needed = [text_field, *([] if domain is not None else [domain_field])]
    needed += [mode_field] if mode_field is not None else []
    for field in needed:
        if field not in columns:
            raise DataError(f"{name}: missing field {field!r} (fields: {sorted(columns)})")
    data = dataset.select_columns(needed).to_dict()
    records = ({field: data[field][i] for field in needed} for i in range(len(dataset)))
    return [
        _make_document(record, text_field, domain_field, mode_field, domain, f"{name}[{i}]")
        for i, record in enumerate(records)
    ]


@lru_cache(maxsize=1)
def _embedded_bilingual() -> tuple[Document, ...]:
    root = resources.files("evil_moe.data") / "embedded"
    docs: list[Document] = []
    for dom, filename in EMBEDDED_FILES.items():
        with resources.as_file(root / filename) as path:
            part = load_jsonl(path, domain_field="lang")
        if any(d.domain != dom for d in part):
            raise DataError(f"embedded file {filename} does not hold only domain {dom!r}")
        docs.extend(part)
    return tuple(docs)


def embedded_bilingual() -> list[Document]:
    """The embedded bilingual TinyStories sample: English (``"en"``) then Russian (``"ru"``)."""
    return list(_embedded_bilingual())


def domain_counts(docs: Iterable[Document]) -> dict[str, int]:
    """Number of documents per domain (sorted by domain)."""
    counts: dict[str, int] = {}
    for doc in docs:
        counts[doc.domain] = counts.get(doc.domain, 0) + 1
    return dict(sorted(counts.items()))
