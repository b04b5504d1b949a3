"""The results store of a study: one SQLite file, one transaction per finished run.

``DIR/results.sqlite`` in WAL mode with ``synchronous=FULL``. A run is written in a
single transaction when it has finished (config, every measurement, wall time), keyed by
the sha256 of its resolved config, so a killed study (Ctrl-C, ``kill -9``, power loss)
loses at most the runs in flight and a half-written run is never visible. Running the
same study again skips every stored key.

The file identifies itself: ``PRAGMA application_id`` is :data:`APPLICATION_ID`,
``PRAGMA user_version`` the schema version, and table ``meta`` holds the schema version,
the study identifier and the preset it came from. Opening a file that is not a SQLite
database, is corrupted, belongs to another application, has another schema version, or
holds another study raises :class:`StoreError` and leaves the file exactly as it was.
A new store is built under a temporary name and linked into place only when complete.

Schema (version 1)::

    meta(key TEXT PRIMARY KEY, value TEXT)
    runs(key TEXT PRIMARY KEY, kind TEXT, name TEXT, corpus TEXT, seed INTEGER,
         recall REAL, forget_tokens INTEGER, config TEXT, result TEXT,
         wall_s REAL, finished_at TEXT)
    failures(id INTEGER PRIMARY KEY, key TEXT, label TEXT, error TEXT, at TEXT)
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from evil_moe.io import atomic_write
from evil_moe.study.spec import RunSpec, canonical_json, config_hash

SCHEMA_VERSION = 1
#: "EvMo" as a big-endian 32-bit integer: marks the file as an evil_moe results store
APPLICATION_ID = 0x45764D6F
STORE_NAME = "results.sqlite"
_SQLITE_HEADER = b"SQLite format 3\x00"

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE runs (
    key TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    corpus TEXT NOT NULL,
    seed INTEGER NOT NULL,
    recall REAL,
    forget_tokens INTEGER,
    config TEXT NOT NULL,
    result TEXT NOT NULL,
    wall_s REAL NOT NULL,
    finished_at TEXT NOT NULL
);
CREATE TABLE failures (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL,
    label TEXT NOT NULL,
    error TEXT NOT NULL,
    at TEXT NOT NULL
);
"""


class StoreError(RuntimeError):
    """The results store cannot be used (corrupted, foreign, another study, locked)."""


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), timeout=30.0, isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 30000")
    return conn


class ResultStore:
    """Finished runs of one study. Use :meth:`open`; close with :meth:`close`."""

    def __init__(self, path: Path, conn: sqlite3.Connection, meta: dict[str, str]):
        self.path = path
        self.conn = conn
        self.meta = meta
        self._lock: Any = None

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        directory: str | Path,
        study_id: str,
        source: str = "",
        spec: dict[str, Any] | None = None,
        create: bool = True,
    ) -> ResultStore:
        """Open (or create) ``directory/results.sqlite`` for study ``study_id``."""
        directory = Path(directory)
        path = directory / STORE_NAME
        if directory.exists() and not directory.is_dir():
            raise StoreError(f"--out {str(directory)!r} exists and is not a directory")
        if not path.exists():
            if not create:
                raise StoreError(f"{path} does not exist")
            directory.mkdir(parents=True, exist_ok=True)
            cls._create(path, study_id, source, spec or {})
        store = cls._open_existing(path)
        if store.meta.get("study_id") != study_id:
            store.close()
            raise StoreError(
                f"{path} holds another study (id {store.meta.get('study_id')}, from "
                f"{store.meta.get('source') or 'unknown'}), not this one (id {study_id}); "
                "use a new --out directory (the existing results are left untouched)"
            )
        return store

    @classmethod
    def read(cls, directory: str | Path) -> ResultStore:
        """Open an existing store of any study, e.g. to rebuild its report."""
        return cls._open_existing(Path(directory) / STORE_NAME)

    @staticmethod
    def _create(path: Path, study_id: str, source: str, spec: dict[str, Any]) -> None:
        def build(tmp: str) -> None:
            conn = _connect(Path(tmp))
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                conn.execute("BEGIN")
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                meta = {
                    "schema_version": str(SCHEMA_VERSION),
                    "study_id": study_id,
                    "source": source,
                    "spec": canonical_json(spec),
                    "created_at": _now(),
                }
                conn.executemany("INSERT INTO meta VALUES (?, ?)", list(meta.items()))
                conn.execute("COMMIT")
            except BaseException:
                conn.close()
                for side in (Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
                    side.unlink(missing_ok=True)
                raise
            conn.close()  # the last connection: SQLite folds the WAL in and removes it

        # linked into place only when complete; a store created meanwhile is kept
        atomic_write(path, build, replace=False)

    @classmethod
    def _open_existing(cls, path: Path) -> ResultStore:
        if not path.is_file():
            raise StoreError(f"{path} does not exist or is not a file")
        with open(path, "rb") as f:
            header = f.read(len(_SQLITE_HEADER))
        if header != _SQLITE_HEADER:
            raise StoreError(
                f"{path} is not an evil_moe results store (not a SQLite database); "
                "refusing to touch it: move it away or use another --out"
            )
        try:
            conn = _connect(path)
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
            app = conn.execute("PRAGMA application_id").fetchone()[0]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.DatabaseError as err:
            raise StoreError(f"{path} is corrupted ({err}); it was left untouched") from None
        if check != "ok":
            conn.close()
            raise StoreError(f"{path} is corrupted ({check}); it was left untouched")
        if app != APPLICATION_ID:
            conn.close()
            raise StoreError(
                f"{path} is a SQLite database of another application (application_id "
                f"{app:#x}), not an evil_moe results store; refusing to touch it"
            )
        if version != SCHEMA_VERSION:
            conn.close()
            raise StoreError(
                f"{path} has results-store schema version {version}; this evil_moe reads "
                f"version {SCHEMA_VERSION}"
            )
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            conn.execute("SELECT key FROM runs LIMIT 1").fetchall()
            conn.execute("SELECT key FROM failures LIMIT 1").fetchall()
        except sqlite3.DatabaseError as err:
            conn.close()
            raise StoreError(f"{path} is corrupted or incomplete ({err}); left untouched") from None
        if meta.get("schema_version") != str(SCHEMA_VERSION) or "study_id" not in meta:
            conn.close()
            raise StoreError(f"{path} has no valid study metadata; it was left untouched")
        return cls(path, conn, meta)

    def lock(self) -> None:
        """Hold an exclusive lock for this process: one study process per store."""
        handle = open(self.path.with_name(f".{self.path.name}.lock"), "a")  # noqa: SIM115
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise StoreError(f"{self.path} is in use by another study process") from None
        self._lock = handle

    def close(self) -> None:
        self.conn.close()
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- runs ------------------------------------------------------------------------------

    def keys(self) -> set[str]:
        return {row[0] for row in self.conn.execute("SELECT key FROM runs")}

    def count(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0])

    def put_run(self, run: RunSpec, result: dict[str, Any], wall_s: float) -> bool:
        """Store a finished run in one transaction; False if its key was already there."""
        if config_hash(run.config) != run.key:
            raise StoreError(f"run {run.label}: key does not match its config")
        row = (
            run.key,
            run.kind,
            run.name,
            run.corpus,
            run.seed,
            run.recall,
            run.forget_tokens,
            canonical_json(run.config.to_dict()),
            json.dumps(result, allow_nan=True),
            float(wall_s),
            _now(),
        )
        with self._transaction():
            cur = self.conn.execute(
                "INSERT OR IGNORE INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row
            )
        return cur.rowcount == 1

    def record_failure(self, run: RunSpec, error: str) -> None:
        with self._transaction():
            self.conn.execute(
                "INSERT INTO failures (key, label, error, at) VALUES (?, ?, ?, ?)",
                (run.key, run.label, error[-20000:], _now()),
            )

    def failures(self) -> list[dict[str, Any]]:
        rows = self.conn.execute("SELECT key, label, error, at FROM failures ORDER BY id")
        return [dict(zip(("key", "label", "error", "at"), r, strict=True)) for r in rows]

    def runs(self) -> list[dict[str, Any]]:
        """Every stored run, with ``config`` and ``result`` parsed."""
        cols = (
            "key",
            "kind",
            "name",
            "corpus",
            "seed",
            "recall",
            "forget_tokens",
            "config",
            "result",
            "wall_s",
            "finished_at",
        )
        out = []
        for row in self.conn.execute(f"SELECT {', '.join(cols)} FROM runs ORDER BY rowid"):
            record = dict(zip(cols, row, strict=True))
            record["config"] = json.loads(record["config"])
            record["result"] = json.loads(record["result"])
            out.append(record)
        return out

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")
