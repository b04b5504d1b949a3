"""The default data pipeline: from documents to training and held-out sequences.

:func:`prepare_bilingual` (embedded English/Russian TinyStories) or
:func:`prepare_documents` (any documents, e.g. from
:func:`~evil_moe.data.corpus.load_jsonl`): cap, split off held-out documents, subsample
to a forget share, label with the monitor, tokenize and pack
(:func:`~evil_moe.data.batching.pack_documents`). Every step is deterministic for a
given seed.
"""

from __future__ import annotations

from collections.abc import Sequence, Set
from dataclasses import dataclass, field, replace

import numpy as np
from tokenizers import Tokenizer

from evil_moe.data.batching import (
    CAP,
    EVAL_CATEGORIES,
    SPLIT,
    SUBSAMPLE,
    TokenSequences,
    pack_documents,
    stage_rng,
    token_counts,
)
from evil_moe.data.corpus import BILINGUAL_FORGET_DOMAIN, Document, embedded_bilingual
from evil_moe.data.monitor import LabelledDocument, Monitor
from evil_moe.data.tokenizer import default_tokenizer, encode_texts

__all__ = [
    "PreparedData",
    "cap_documents",
    "prepare_bilingual",
    "prepare_documents",
    "split_documents",
    "subsample_domain",
    "subsample_to_share",
]


def split_documents(
    docs: Sequence[Document], eval_fraction: float, seed: int = 0
) -> tuple[list[Document], list[Document]]:
    """Split into (train, eval), stratified by (domain, mode); both keep the input order.

    Each stratum of ``n`` documents gives ``round(n * eval_fraction)`` documents to eval
    (at least one if ``eval_fraction > 0`` and ``n >= 2``).
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    rng = stage_rng(seed, SPLIT)
    strata: dict[tuple[str, int], list[int]] = {}
    for i, doc in enumerate(docs):
        strata.setdefault((doc.domain, doc.mode), []).append(i)
    held_out: set[int] = set()
    for key in sorted(strata):
        members = strata[key]
        k = round(len(members) * eval_fraction)
        if eval_fraction > 0 and len(members) >= 2:
            k = min(max(k, 1), len(members) - 1)
        chosen = rng.permutation(len(members))[:k]
        held_out.update(members[j] for j in chosen.tolist())
    train = [d for i, d in enumerate(docs) if i not in held_out]
    evals = [d for i, d in enumerate(docs) if i in held_out]
    return train, evals


def subsample_domain(
    docs: Sequence[Document],
    domain: str,
    fraction: float,
    seed: int = 0,
    *,
    unit: str = "chars",
) -> list[Document]:
    """Keep a random ``fraction`` of ``domain``'s documents; other documents are untouched.

    ``unit="chars"``: the kept documents hold about ``fraction`` of the domain's characters
    (the prefix of a random order whose size is closest to it);
    ``unit="docs"``: ``round(fraction * n)`` documents. Input order is kept.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    if unit not in ("chars", "docs"):
        raise ValueError(f"unit must be 'chars' or 'docs', got {unit!r}")
    members = [i for i, d in enumerate(docs) if d.domain == domain]
    order = [members[j] for j in stage_rng(seed, SUBSAMPLE).permutation(len(members)).tolist()]
    if unit == "docs":
        keep = order[: round(fraction * len(order))]
    else:
        sizes = np.array([len(docs[i].text) for i in order], dtype=np.int64)
        prefix_sums = np.concatenate([[0], np.cumsum(sizes)])
        target = fraction * int(prefix_sums[-1])
        keep = order[: int(np.argmin(np.abs(prefix_sums - target)))]
    kept = set(keep)
    return [d for i, d in enumerate(docs) if d.domain != domain or i in kept]


def subsample_to_share(
    docs: Sequence[Document], forget_domains: Set[str], share: float, seed: int = 0
) -> list[Document]:
    """Subsample so that ``forget_domains`` hold about ``share`` of all characters.

    Whichever side is in excess is subsampled (every domain of it by the same character
    fraction); the other side is kept whole. ``share=0`` drops the forget domains.
    """
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"forget_share must be in [0, 1], got {share}")
    chars: dict[str, int] = {}
    for doc in docs:
        chars[doc.domain] = chars.get(doc.domain, 0) + len(doc.text)
    forget = sum(n for d, n in chars.items() if d in forget_domains)
    rest = sum(n for d, n in chars.items() if d not in forget_domains)
    if share > 0 and forget == 0:
        raise ValueError(f"forget_share={share} but there is no forget-domain text")
    if share < 1 and rest == 0:
        raise ValueError(f"forget_share={share} but there is no retain-domain text")
    current = forget / (forget + rest)
    if share == current:
        return list(docs)
    if share < current:
        shrink = [d for d in chars if d in forget_domains]
        fraction = share * rest / ((1.0 - share) * forget)
    else:
        shrink = [d for d in chars if d not in forget_domains]
        fraction = (1.0 - share) * forget / (share * rest)
    out = list(docs)
    for domain in sorted(shrink):
        out = subsample_domain(out, domain, min(fraction, 1.0), seed)
    return out


def cap_documents(docs: Sequence[Document], max_docs: int, seed: int = 0) -> list[Document]:
    """Keep at most ``max_docs`` random documents per domain (input order kept)."""
    if max_docs < 1:
        raise ValueError(f"max_docs must be >= 1, got {max_docs}")
    by_domain: dict[str, list[int]] = {}
    for i, doc in enumerate(docs):
        by_domain.setdefault(doc.domain, []).append(i)
    rng = stage_rng(seed, CAP)
    kept: set[int] = set()
    for domain in sorted(by_domain):
        members = by_domain[domain]
        chosen = rng.permutation(len(members))[:max_docs]
        kept.update(members[j] for j in chosen.tolist())
    return [d for i, d in enumerate(docs) if i in kept]


@dataclass
class PreparedData:
    """Output of :func:`prepare_documents`: training and held-out sequences."""

    train: TokenSequences
    #: held-out sequences per category of :data:`EVAL_CATEGORIES` (possibly empty)
    eval: dict[str, TokenSequences]
    #: training tokens per category (``forget_undiscovered`` is the leakage denominator)
    train_token_counts: dict[str, int]
    eval_token_counts: dict[str, int]
    tokenizer: Tokenizer
    forget_domains: frozenset[str]
    seq_len: int
    train_docs: list[LabelledDocument] = field(default_factory=list, repr=False)
    eval_docs: list[LabelledDocument] = field(default_factory=list, repr=False)

    @property
    def vocab_size(self) -> int:
        """Vocabulary size of the tokenizer."""
        return int(self.tokenizer.get_vocab_size())


def prepare_documents(
    docs: Sequence[Document],
    forget_domains: Set[str],
    seq_len: int = 128,
    eval_fraction: float = 0.1,
    forget_share: float | None = None,
    monitor: Monitor | None = None,
    seed: int = 0,
    tokenizer: Tokenizer | None = None,
    max_docs: int | None = None,
) -> PreparedData:
    """The default data pipeline for any documents.

    1. ``max_docs``: keep at most that many random documents per domain;
    2. split off ``eval_fraction`` of each (domain, mode) as held-out documents;
    3. ``forget_share``: subsample the training documents so the forget domains hold about
       that share of the training characters (``None`` = keep the natural mix);
    4. label training documents with ``monitor`` (default ``Monitor()``), and held-out ones
       with the same recall but no false positives and every retain document ``retain``,
       so held-out forget documents split into labelled and undiscovered;
    5. tokenize (one parallel batch) and pack (see :func:`pack_documents`).
    """
    if isinstance(forget_domains, str):
        raise TypeError("forget_domains must be a set of domain names, not a string")
    forget_domains = frozenset(forget_domains)
    if not docs:
        raise ValueError("no documents")
    monitor = monitor if monitor is not None else Monitor()
    monitor.validate()
    tokenizer = tokenizer if tokenizer is not None else default_tokenizer()
    if max_docs is not None:
        docs = cap_documents(docs, max_docs, seed)
    train_docs, eval_docs = split_documents(docs, eval_fraction, seed)
    if forget_share is not None:
        train_docs = subsample_to_share(train_docs, forget_domains, forget_share, seed)
    eval_monitor = replace(monitor, false_positive_rate=0.0, retain_labeled_share=1.0)
    train_labelled = monitor.label(train_docs, forget_domains, stream=0)
    eval_labelled = eval_monitor.label(eval_docs, forget_domains, stream=1)
    ids = encode_texts(tokenizer, [d.text for d in (*train_docs, *eval_docs)])
    n_train = len(train_docs)
    train = pack_documents(train_labelled, seq_len, seed, token_ids=ids[:n_train])
    held_out = pack_documents(eval_labelled, seq_len, seed, token_ids=ids[n_train:])
    evals = {c: held_out.select(c) for c in EVAL_CATEGORIES}
    return PreparedData(
        train=train,
        eval=evals,
        train_token_counts=token_counts(train),
        eval_token_counts={c: s.num_tokens for c, s in evals.items()},
        tokenizer=tokenizer,
        forget_domains=forget_domains,
        seq_len=seq_len,
        train_docs=train_labelled,
        eval_docs=eval_labelled,
    )


def prepare_bilingual(
    seq_len: int = 128,
    eval_fraction: float = 0.1,
    forget_share: float | None = None,
    monitor: Monitor | None = None,
    seed: int = 0,
    tokenizer: Tokenizer | None = None,
    max_docs: int | None = None,
) -> PreparedData:
    """:func:`prepare_documents` on the embedded TinyStories: English retain, Russian forget."""
    return prepare_documents(
        embedded_bilingual(),
        {BILINGUAL_FORGET_DOMAIN},
        seq_len=seq_len,
        eval_fraction=eval_fraction,
        forget_share=forget_share,
        monitor=monitor,
        seed=seed,
        tokenizer=tokenizer,
        max_docs=max_docs,
    )
