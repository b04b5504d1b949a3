"""The simulated monitor."""

from __future__ import annotations

import pytest

from evil_moe.data.corpus import Document
from evil_moe.data.monitor import LabelledDocument, Monitor

N = 20_000
FORGET = [Document(f"f{i}", "ru", i % 3) for i in range(N)]
RETAIN = [Document(f"r{i}", "en") for i in range(N)]


def share(labelled: list[LabelledDocument], route: str) -> float:
    return sum(ld.route == route for ld in labelled) / len(labelled)


def test_recall_and_false_positive_rate() -> None:
    monitor = Monitor(recall=0.3, false_positive_rate=0.05, retain_labeled_share=0.6, seed=1)
    labelled = monitor.label(FORGET + RETAIN, {"ru"})
    forget, retain = labelled[:N], labelled[N:]
    assert all(ld.is_forget_domain for ld in forget)
    assert not any(ld.is_forget_domain for ld in retain)
    assert share(forget, "forget") == pytest.approx(0.3, abs=0.015)
    assert share(forget, "retain") == 0
    assert share(retain, "forget") == pytest.approx(0.05, abs=0.006)
    assert share(retain, "retain") == pytest.approx(0.95 * 0.6, abs=0.015)
    assert all(ld.undiscovered == (ld.route == "unlabeled") for ld in forget)
    assert not any(ld.undiscovered for ld in retain)
    assert all(ld.doc is doc for ld, doc in zip(labelled, FORGET + RETAIN, strict=True))


def test_categories() -> None:
    labelled = Monitor(0.5, 0.1, 0.5).label(FORGET[:500] + RETAIN[:500], {"ru"})
    expected = {
        (True, "forget"): "forget_labeled",
        (True, "unlabeled"): "forget_undiscovered",
        (False, "retain"): "retain",
        (False, "unlabeled"): "retain_unlabeled",
        (False, "forget"): "retain_false_positive",
    }
    seen = {(ld.is_forget_domain, ld.route) for ld in labelled}
    assert seen == set(expected)
    for ld in labelled:
        assert ld.category == expected[(ld.is_forget_domain, ld.route)]
        assert ld.false_positive == (ld.category == "retain_false_positive")


def test_extremes() -> None:
    docs = FORGET[:1000] + RETAIN[:1000]
    all_on = Monitor(recall=1.0, false_positive_rate=0.0).label(docs, {"ru"})
    assert [ld.route for ld in all_on] == ["forget"] * 1000 + ["retain"] * 1000
    all_off = Monitor(recall=0.0, retain_labeled_share=0.0).label(docs, {"ru"})
    assert {ld.route for ld in all_off} == {"unlabeled"}
    assert all(ld.undiscovered for ld in all_off[:1000])


def test_deterministic_per_seed_and_nested() -> None:
    docs = FORGET[:5000]
    routes = [ld.route for ld in Monitor(recall=0.5, seed=7).label(docs, {"ru"})]
    again = [ld.route for ld in Monitor(recall=0.5, seed=7).label(docs, {"ru"})]
    other = [ld.route for ld in Monitor(recall=0.5, seed=8).label(docs, {"ru"})]
    stream = [ld.route for ld in Monitor(recall=0.5, seed=7).label(docs, {"ru"}, stream=1)]
    assert routes == again
    assert routes != other and routes != stream
    low = Monitor(recall=0.2, seed=7).label(docs, {"ru"})
    assert all(r == "forget" for ld, r in zip(low, routes, strict=True) if ld.route == "forget")


def test_per_mode_recall() -> None:
    monitor = Monitor(recall={0: 0.9, 1: 0.5, 2: 0.1}, seed=3)
    labelled = monitor.label(FORGET + RETAIN[:100], {"ru"})
    for mode, recall in monitor.recall.items():
        of_mode = [ld for ld in labelled[:N] if ld.doc.mode == mode]
        assert share(of_mode, "forget") == pytest.approx(recall, abs=0.025)
    assert {ld.route for ld in labelled[N:]} == {"retain"}  # retain docs need no mode
    with pytest.raises(ValueError, match="mode 2"):
        Monitor(recall={0: 0.5, 1: 0.5}).label(FORGET[:10], {"ru"})


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"recall": 1.5}, "recall"),
        ({"recall": -0.1}, "recall"),
        ({"recall": {0: 2.0}}, r"recall\[0\]"),
        ({"recall": {}}, "recall"),
        ({"recall": {"a": 0.5}}, "recall"),
        ({"false_positive_rate": 1.01}, "false_positive_rate"),
        ({"retain_labeled_share": -1}, "retain_labeled_share"),
        ({"seed": -1}, "seed"),
    ],
)
def test_invalid_values(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        Monitor(**kwargs)  # type: ignore[arg-type]


def test_mutated_monitor_is_revalidated() -> None:
    monitor = Monitor()
    monitor.recall = 3.0
    with pytest.raises(ValueError, match="recall"):
        monitor.label(FORGET[:3], {"ru"})
