"""End to end: a tiny grid through worker processes, the report, resume after kill -9."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from evil_moe.cli.main import main
from evil_moe.study.claims import load_claims
from evil_moe.study.spec import expand, load_spec, unique_runs
from evil_moe.study.store import STORE_NAME

SRC = Path(__file__).resolve().parents[2] / "src"
_CLAIMS = load_claims()[1]
ALL = sorted({c.variant for c in _CLAIMS} | {c.reference for c in _CLAIMS} | {"filter", "oracle4"})


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory, preset_writer):
    root = tmp_path_factory.mktemp("study")
    preset = preset_writer(root, ALL, [0, 1], corpora=["hacks"])
    out = root / "out"
    code = main(["study", "--preset", str(preset), "--out", str(out), "--jobs", "2", "--quiet"])
    return preset, out, code


def _stored(out: Path) -> list[tuple[str, str]]:
    conn = sqlite3.connect(out / STORE_NAME)
    try:
        return conn.execute("SELECT key, finished_at FROM runs ORDER BY key").fetchall()
    finally:
        conn.close()


def test_the_report_has_every_table_row(tiny_study):
    preset, out, code = tiny_study
    assert code == 0
    spec, _ = load_spec(str(preset))
    assert len(_stored(out)) == len(unique_runs(expand(spec)))
    verdicts = json.loads((out / "verdicts.json").read_text())
    assert [r["row"] for r in verdicts["rows"]] == list(range(1, 8))
    assert [c["id"] for c in verdicts["claims"]] == [c.id for c in _CLAIMS]
    for claim in verdicts["claims"]:
        assert claim["verdict"] in ("supported", "refuted", "inconclusive")
        assert "rule" in claim or "reason" in claim
        if "test" in claim:  # every tested claim states its reference and interval
            assert claim["reference"] and claim["difference"]["n"] >= 1
    assert {g["gate"] for g in verdicts["gates"]} == {
        "data filtering has leakage about 1",
        "oracle assignment specialises",
        "random assignment does not specialise",
    }
    assert isinstance(verdicts["verdicts_issued"], bool)
    assert not verdicts["missing_runs"]
    md = (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    for row in verdicts["rows"]:
        assert row["mechanism"] in md and row["mechanism"] in page
    for name in ALL:
        assert name in md and name in page
    assert page.count("data:image/png;base64,") >= 5, "plots are embedded"
    assert "<img" in page and 'src="plots/' not in page, "self-contained"
    assert (out / "plots" / "heatmaps.png").is_file()


def test_running_again_skips_finished_runs(tiny_study, capsys):
    preset, out, _ = tiny_study
    before = _stored(out)
    assert main(["study", "--preset", str(preset), "--out", str(out), "--quiet"]) == 0
    assert _stored(out) == before
    assert "finished 0" not in capsys.readouterr().err  # nothing was run at all


def test_a_different_study_cannot_reuse_the_directory(tiny_study, preset_factory, capsys):
    _, out, _ = tiny_study
    other = preset_factory(["single"], [7], name="other")
    before = _stored(out)
    assert main(["study", "--preset", str(other), "--out", str(out), "--quiet"]) == 2
    assert "another study" in capsys.readouterr().err
    assert _stored(out) == before


def test_resume_after_kill_9_loses_nothing_and_counts_nothing_twice(
    tmp_path, preset_factory, cli_process
):
    preset = preset_factory(["single", "filter", "fine4"], [0, 1], steps=40)
    out = tmp_path / "out"
    args = ["study", "--preset", str(preset), "--out", str(out), "--jobs", "2", "--quiet"]
    study = cli_process(args)
    study.wait_for(lambda: (out / STORE_NAME).exists() and bool(_stored(out)), "a stored run")
    study.signal_group(signal.SIGKILL)  # the study and its workers, mid-run
    study.finish()
    survived = _stored(out)
    spec, _ = load_spec(str(preset))
    total = len(unique_runs(expand(spec)))
    assert 1 <= len(survived) < total, "killed mid-grid"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    cmd = [sys.executable, "-m", "evil_moe.cli.main", *args]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    after = _stored(out)
    assert len(after) == total == len({k for k, _ in after}), "every run exactly once"
    assert set(survived) <= set(after), "runs stored before the kill are kept as they were"
    assert f"{len(survived)} already finished" in result.stderr


def test_ctrl_c_stops_cleanly_and_keeps_finished_runs(
    tmp_path, preset_factory, cli_process, stop_case
):
    preset = preset_factory(["single", "fine4"], [0, 1], steps=40)
    out = tmp_path / "out"
    total = len(unique_runs(expand(load_spec(str(preset))[0])))
    study = cli_process(
        ["study", "--preset", str(preset), "--out", str(out), "--jobs", "2", "--quiet"],
        sigint_ignored=stop_case.sigint_ignored,
    )
    seen: list[tuple[str, str]] = []

    def some_finished_and_more_to_run() -> bool:
        seen[:] = _stored(out) if (out / STORE_NAME).exists() else []
        return 1 <= len(seen) < total

    study.wait_for(some_finished_and_more_to_run, "a run finished with more in flight")
    study.signal_group(stop_case.signum)  # what a terminal's Ctrl-C (or Slurm's SIGTERM) sends
    returncode, err = study.finish()
    assert returncode == stop_case.code, err
    assert stop_case.word in err
    kept = _stored(out)
    assert set(seen) <= set(kept) and len(kept) < total, "finished runs survive, no more"
    conn = sqlite3.connect(out / STORE_NAME)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    study.wait_group_gone()  # no worker process is left behind
