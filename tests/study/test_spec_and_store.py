"""Presets, run keys, and the results store's refusal to touch what is not its own."""

from __future__ import annotations

import sqlite3

import pytest

from evil_moe.cli.main import EXIT_BAD_INPUT, main
from evil_moe.study.claims import load_claims
from evil_moe.study.runner import find_run
from evil_moe.study.spec import (
    StudyError,
    config_hash,
    expand,
    load_spec,
    parse_spec,
    unique_runs,
)
from evil_moe.study.store import SCHEMA_VERSION, STORE_NAME, ResultStore, StoreError


@pytest.mark.parametrize("preset", ["quick", "settle", "full"])
def test_presets_parse_and_test_every_claim_and_gate(preset):
    spec, _ = load_spec(preset)
    names = set(spec.variants_in())
    _, claims = load_claims()
    for claim in claims:
        assert {claim.variant, claim.reference} <= names, claim.id
    assert {"filter", "oracle4", "random4"} <= names  # the controls of the gates
    assert "hacks" in {c for b in spec.grid for c in b.corpora}
    assert all(len(b.seeds) >= 2 for b in spec.grid)
    # every contrast is at equal quarantine parameters on the preset's own testbed
    runs = [r for r in expand(spec) if r.kind == "grid"]
    for claim in claims:
        sizes = set()
        for run in runs:
            if run.name in (claim.variant, claim.reference):
                m = run.config.model
                sizes.add((m.quarantine_width, m.n_quarantine_heads))
        assert len(sizes) == 1, (claim.id, sizes)


def test_grid_blocks_sweeps_and_preset_variants(preset_factory):
    extra = (
        '\n[variants]\nwide = ["model.mlp_width=40"]\n'
        '\n[[grid]]\nname = "lr"\nvariants = ["single", "wide"]\nseeds = [3]\n'
        'recalls = [0.2]\ncorpora = ["bilingual"]\nsweep = {"train.lr" = [0.01, 0.1]}\n'
        'overrides = ["train.epochs=2"]\n'
    )
    text = preset_factory(["single"], [0], extra="").read_text().replace("[grid]", "[[grid]]")
    path = preset_factory(["single"], [0], name="blocks").parent / "blocks2.toml"
    path.write_text(text + extra, encoding="utf-8")
    spec, _ = load_spec(str(path))
    assert [b.name for b in spec.grid] == ["main", "lr"]
    lr_runs = [r for r in expand(spec) if r.block == "lr"]
    assert len(lr_runs) == 4
    assert {(r.name, r.config.train.lr) for r in lr_runs} == {
        (n, lr) for n in ("single", "wide") for lr in (0.01, 0.1)
    }
    assert all(r.config.train.epochs == 2 and r.config.monitor.recall == 0.2 for r in lr_runs)
    assert {r.config.model.mlp_width for r in lr_runs if r.name == "wide"} == {40}
    pairs = {r.pair_key for r in lr_runs}
    assert len(pairs) == 2  # variants pair up within a sweep value, not across


def test_runs_are_keyed_by_the_hash_of_their_resolved_config(preset_factory):
    spec, _ = load_spec(str(preset_factory(["single", "fine4", "demix", "none"], [0, 1])))
    runs = expand(spec)
    for run in runs:
        assert run.key == config_hash(run.config) and len(run.key) == 64
    again = expand(load_spec(str(preset_factory(["single", "fine4", "demix", "none"], [0, 1])))[0])
    assert [r.key for r in runs] == [r.key for r in again]
    by_name = {(r.name, r.seed): r for r in runs if r.kind == "grid"}
    assert by_name[("fine4", 0)].config.model.n_experts == 4
    assert by_name[("demix", 0)].config.train.method == "demix"
    assert by_name[("single", 1)].config.train.seed == 1
    assert by_name[("single", 0)].config.model.d_model == 16  # base applies to every run
    # the `none` reference at the curve's recall is the curve's n = -1 run: trained once
    curve_top = [r for r in runs if r.kind == "baseline" and r.forget_tokens == -1]
    assert {r.key for r in curve_top} == {r.key for r in runs if r.name == "none"}
    assert len(unique_runs(runs)) == len(runs) - 2


def test_one_run_of_a_preset_is_found_by_its_label(preset_factory):
    spec, _ = load_spec(str(preset_factory(["single", "fine4"], [0, 1])))
    run = next(r for r in expand(spec) if r.name == "fine4" and r.seed == 1)
    found = find_run(spec, run.label)
    assert found.key == run.key
    assert found.config.model.n_experts == 4 and found.config.train.seed == 1
    with pytest.raises(StudyError, match=f"no run 'fine5 seed=0' in the {spec.study.name} preset"):
        find_run(spec, "fine5 seed=0")


@pytest.mark.parametrize(
    ("change", "expect"),
    [
        ({"grid": {"variants": ["single", "fine5"]}}, "fine5"),
        ({"grid": {"variants": ["fine4"]}}, "'single'"),
        ({"grid": {"variants": ["single"], "colour": 1}}, "grid.colour"),
        ({"grdi": {}}, "[grdi]"),
        ({"base": {"model": {"d_modle": 8}}}, "d_modle"),
        ({"base": {"train": {"steps": "many"}}}, "train.steps"),
        ({"grid": {"variants": ["single"], "recalls": [1.0]}}, "grid[main].recalls"),
        ({"baseline": {"forget_tokens": [100, -1]}}, "forget_tokens"),
        ({"measure": {"interpolation": "spline"}}, "interpolation"),
        ({"grid": {"variants": ["single"], "seeds": "0"}}, "grid.seeds"),
        ({"grid": [{"name": "a"}, {"name": "a"}]}, "same name"),
        (
            {"grid": {"variants": ["single"], "sweep": {"train.lr": [1], "train.seed": [1]}}},
            "sweep",
        ),
        ({"baseline": {"corpora": ["hacks"]}}, "baseline.corpora"),
        ({"verdict": {"filter_leakage": [1.2, 0.8]}}, "filter_leakage"),
        ({"variants": {"mine": "model.d_model=8"}}, "variants"),
    ],
)
def test_bad_presets_are_refused(change, expect):
    with pytest.raises(StudyError) as err:
        parse_spec(change)
    assert expect in str(err.value)


def test_cli_bad_preset_exits_2_before_anything_runs(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[grid]\nvariants = ["single", "moe9000"]\n', encoding="utf-8")
    out = tmp_path / "out"
    assert main(["study", "--preset", str(bad), "--out", str(out)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "moe9000" in err and err.count("\n") == 1
    assert not out.exists()
    assert main(["study", "--preset", "nonexistent", "--out", str(out)]) == EXIT_BAD_INPUT
    assert "nonexistent" in capsys.readouterr().err
    bad.write_text("[grid\n", encoding="utf-8")
    assert main(["study", "--preset", str(bad), "--out", str(out)]) == EXIT_BAD_INPUT
    assert "TOML" in capsys.readouterr().err
    assert not out.exists()


def _store_with_one_run(tmp_path, preset_factory):
    spec, source = load_spec(str(preset_factory(["single"], [0])))
    store = ResultStore.open(tmp_path / "s", spec.study_id, source, spec.to_dict())
    run = expand(spec)[0]
    assert store.put_run(run, {"x": 1}, 1.0)
    assert not store.put_run(run, {"x": 2}, 1.0), "a key is stored once"
    store.close()
    return spec, run


def test_store_round_trip_and_metadata(tmp_path, preset_factory):
    spec, run = _store_with_one_run(tmp_path, preset_factory)
    with ResultStore.open(tmp_path / "s", spec.study_id) as store:
        assert store.keys() == {run.key}
        (rec,) = store.runs()
        assert rec["result"] == {"x": 1} and rec["config"]["train"]["seed"] == 0
        assert store.meta["study_id"] == spec.study_id
        assert store.meta["schema_version"] == str(SCHEMA_VERSION)
        assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with pytest.raises(StoreError, match="another study"):
        ResultStore.open(tmp_path / "s", "0123456789abcdef")


def _unchanged(path, action):
    before = path.read_bytes()
    with pytest.raises(StoreError) as err:
        action()
    assert path.read_bytes() == before, "the file must be left exactly as it was"
    return str(err.value)


def test_foreign_and_corrupted_stores_are_refused_untouched(tmp_path, preset_factory):
    spec, _ = _store_with_one_run(tmp_path, preset_factory)
    target = tmp_path / "x"
    target.mkdir()
    path = target / STORE_NAME

    def open_it():
        ResultStore.open(target, spec.study_id)

    path.write_text("my shopping list\n", encoding="utf-8")
    assert "not a SQLite database" in _unchanged(path, open_it)
    path.unlink()
    other = sqlite3.connect(path)
    other.execute("CREATE TABLE t (a)")
    other.commit()
    other.close()
    assert "another application" in _unchanged(path, open_it)
    path.unlink()
    good = (tmp_path / "s" / STORE_NAME).read_bytes()
    corrupt = bytearray(good)
    for i in range(100, len(corrupt), 7):  # the header stays, the pages are garbage
        corrupt[i] = (corrupt[i] * 31 + 17) % 256
    path.write_bytes(bytes(corrupt))
    assert "corrupt" in _unchanged(path, open_it)


def test_cli_refuses_a_foreign_store(tmp_path, preset_factory, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / STORE_NAME).write_text("not a database", encoding="utf-8")
    preset = preset_factory(["single"], [0])
    assert main(["study", "--preset", str(preset), "--out", str(out)]) == EXIT_BAD_INPUT
    assert "not a SQLite database" in capsys.readouterr().err
    assert (out / STORE_NAME).read_text(encoding="utf-8") == "not a database"


def test_one_study_process_per_store(tmp_path, preset_factory):
    spec, _ = _store_with_one_run(tmp_path, preset_factory)
    first = ResultStore.open(tmp_path / "s", spec.study_id)
    first.lock()
    second = ResultStore.open(tmp_path / "s", spec.study_id)
    with pytest.raises(StoreError, match="in use"):
        second.lock()
    second.close()
    first.close()
