"""The one atomic-write helper: whole files or none, never half of one."""

from __future__ import annotations

import os
import stat

import pytest

from evil_moe.io import atomic_write, read_jsonl, write_bytes, write_json, write_jsonl


def test_replace_writes_whole_files_and_leaves_no_temporaries(tmp_path):
    path = tmp_path / "a" / "f.json"
    write_json(path, {"x": 1})
    write_json(path, {"y": 2})
    assert path.read_text() == '{\n  "y": 2\n}\n'
    assert [p.name for p in path.parent.iterdir()] == ["f.json"]
    mode = stat.S_IMODE(os.stat(path).st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "f.bin"
    write_bytes(path, b"old")

    def dies(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(b"ne")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(path, dies)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_create_only_never_replaces(tmp_path):
    path = tmp_path / "store"

    def write(text: bytes):
        def fill(tmp: str) -> None:
            with open(tmp, "wb") as f:
                f.write(text)

        return fill

    assert atomic_write(path, write(b"first"), replace=False) is True
    assert atomic_write(path, write(b"second"), replace=False) is False
    assert path.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["store"]


def test_jsonl_round_trip_skips_a_torn_last_line(tmp_path):
    path = tmp_path / "log.jsonl"
    write_jsonl(path, [{"step": 1}, {"step": 2}])
    with open(path, "a") as f:
        f.write('{"step": ')
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]


def test_remove_temporaries_deletes_only_atomic_write_leftovers(tmp_path):
    from evil_moe.io import remove_temporaries, write_json

    write_json(tmp_path / "kept.json", {"a": 1})
    (tmp_path / "sub").mkdir()
    stale = [tmp_path / ".checkpoint.json.abc123.tmp", tmp_path / "sub" / ".x.safetensors.q.tmp"]
    for path in stale:
        path.write_text("half")
    (tmp_path / "notes.tmp").write_text("not ours: no leading dot")
    remove_temporaries(tmp_path)
    assert not any(p.exists() for p in stale)
    assert (tmp_path / "kept.json").exists() and (tmp_path / "notes.tmp").exists()
    remove_temporaries(tmp_path / "missing")  # no directory: nothing to do
