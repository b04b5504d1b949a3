"""A simulated monitor that assigns route labels to documents.

Forget-domain documents are labelled ``forget`` with probability ``recall`` (per forget
mode if ``recall`` is a dict), else ``unlabeled`` (they are then *undiscovered*).
Retain-domain documents are labelled ``forget`` with probability ``false_positive_rate``,
else ``retain`` with probability ``retain_labeled_share``, else ``unlabeled``.

Each document ``i`` gets one uniform draw ``u_i`` from a numpy generator seeded with
``(seed, stream)``, and its label is a threshold on ``u_i``. So labels are deterministic,
depend only on the seed and the document's position, and are nested across settings: with
the same seed, every document labelled ``forget`` at recall 0.3 is also labelled at 0.5.
"""

from __future__ import annotations

from collections.abc import Sequence, Set
from dataclasses import dataclass

import numpy as np

from evil_moe.data.corpus import Document
from evil_moe.routing.labels import ROUTE_NAMES

#: The route labels, as strings (:class:`~evil_moe.routing.labels.RouteLabel` names).
ROUTES = tuple(ROUTE_NAMES)


@dataclass(frozen=True)
class LabelledDocument:
    """A document with the route label the monitor gave it."""

    doc: Document
    route: str
    is_forget_domain: bool

    @property
    def undiscovered(self) -> bool:
        """Forget-domain data that the monitor missed."""
        return self.is_forget_domain and self.route != "forget"

    @property
    def false_positive(self) -> bool:
        """Retain-domain data that the monitor labelled ``forget``."""
        return not self.is_forget_domain and self.route == "forget"

    @property
    def category(self) -> str:
        """Evaluation category: ``forget_labeled``, ``forget_undiscovered``, ``retain``,
        ``retain_unlabeled`` or ``retain_false_positive``."""
        if self.is_forget_domain:
            return "forget_labeled" if self.route == "forget" else "forget_undiscovered"
        return {
            "retain": "retain",
            "unlabeled": "retain_unlabeled",
            "forget": "retain_false_positive",
        }[self.route]


def _check_unit(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return float(value)


@dataclass
class Monitor:
    """Simulated monitor: recall on forget data, false positives on retain data."""

    recall: float | dict[int, float] = 0.5
    false_positive_rate: float = 0.0
    retain_labeled_share: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field if any setting is out of range."""
        if isinstance(self.recall, dict):
            if not self.recall:
                raise ValueError("recall: per-mode dict must not be empty")
            for mode, value in self.recall.items():
                if isinstance(mode, bool) or not isinstance(mode, int):
                    raise ValueError(f"recall: mode keys must be integers, got {mode!r}")
                _check_unit(f"recall[{mode}]", value)
        else:
            _check_unit("recall", self.recall)
        _check_unit("false_positive_rate", self.false_positive_rate)
        _check_unit("retain_labeled_share", self.retain_labeled_share)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")

    def recall_for(self, mode: int) -> float:
        """Recall on forget documents of ``mode`` (``ValueError`` if the dict lacks it)."""
        if not isinstance(self.recall, dict):
            return float(self.recall)
        if mode not in self.recall:
            raise ValueError(
                f"recall: no value for forget mode {mode} (modes given: {sorted(self.recall)})"
            )
        return float(self.recall[mode])

    def label(
        self, docs: Sequence[Document], forget_domains: Set[str], *, stream: int = 0
    ) -> list[LabelledDocument]:
        """Label ``docs``; ``forget_domains`` names the domains that are forget data.

        ``stream`` selects an independent label stream for the same seed (the data pipeline
        uses 0 for training documents and 1 for held-out documents).
        """
        self.validate()
        if isinstance(forget_domains, str):
            raise TypeError("forget_domains must be a set of domain names, not a string")
        if stream < 0:
            raise ValueError(f"stream must be non-negative, got {stream}")
        draws = np.random.default_rng([self.seed, stream]).random(len(docs))
        fpr = float(self.false_positive_rate)
        retain_cut = fpr + (1.0 - fpr) * float(self.retain_labeled_share)
        out: list[LabelledDocument] = []
        for doc, u in zip(docs, draws.tolist(), strict=True):
            if doc.domain in forget_domains:
                route = "forget" if u < self.recall_for(doc.mode) else "unlabeled"
                out.append(LabelledDocument(doc, route, True))
            else:
                route = "forget" if u < fpr else "retain" if u < retain_cut else "unlabeled"
                out.append(LabelledDocument(doc, route, False))
        return out
