"""From labelled documents to fixed-length causal-LM sequences and minibatches.

Documents are packed into streams grouped by (route label, domain, forget mode, evaluation
category), so every sequence is uniform in its labels; an end-of-text token follows every
document, and each stream is cut into non-overlapping windows of ``seq_len + 1`` tokens
(the remainder is dropped). Input position ``t`` of a window predicts token ``t + 1``.

The whole default pipeline (selecting, labelling, packing) is
:mod:`evil_moe.data.prepare`. Every step is deterministic for a given seed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tokenizers import Tokenizer

from evil_moe.data.monitor import LabelledDocument
from evil_moe.data.tokenizer import EOT_ID, default_tokenizer, encode_texts
from evil_moe.routing.labels import ROUTE_NAMES, RouteLabel

#: Integer codes of route labels in ``route`` tensors, by name (``routing.labels.ROUTE_NAMES``).
ROUTE_CODES = ROUTE_NAMES
#: Evaluation categories of sequences (see :attr:`LabelledDocument.category`).
CATEGORIES = (
    "retain",
    "retain_unlabeled",
    "retain_false_positive",
    "forget_labeled",
    "forget_undiscovered",
)
#: Categories of the held-out sets of :func:`~evil_moe.data.prepare.prepare_documents`.
EVAL_CATEGORIES = ("retain", "forget_labeled", "forget_undiscovered")

# Independent random streams of the pipeline stages, all derived from one seed.
SPLIT, SUBSAMPLE, CAP, PACK, BATCH = 1, 2, 3, 4, 5


def stage_rng(seed: int, stage: int, *extra: int) -> np.random.Generator:
    """The random stream of one pipeline stage (:data:`SPLIT`, ..., :data:`BATCH`)."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return np.random.default_rng([int(seed), stage, *extra])


@dataclass
class TokenSequences:
    """``M`` packed sequences of ``seq_len + 1`` tokens with per-position labels.

    * ``tokens``: long ``[M, seq_len + 1]``; inputs are ``tokens[:, :-1]``, targets
      ``tokens[:, 1:]``.
    * ``route``: long ``[M, seq_len]``, :data:`ROUTE_CODES` per input position.
    * ``mode``: long ``[M, seq_len]``, the document's true forget mode (``-1`` none). Only
      positions with route ``forget`` are labelled: a trainer must not route on ``mode``
      elsewhere (it is there for per-mode evaluation and statistics).
    * ``category``: evaluation category per sequence (one of :data:`CATEGORIES`).
    * ``domain``: source domain per sequence (``""`` if unknown).
    """

    tokens: torch.Tensor
    route: torch.Tensor
    mode: torch.Tensor
    category: list[str]
    domain: list[str] | None = None

    def __post_init__(self) -> None:
        if self.tokens.dim() != 2 or self.tokens.shape[1] < 2:
            raise ValueError(f"tokens must be [M, seq_len + 1], got {tuple(self.tokens.shape)}")
        m, length = self.tokens.shape[0], self.tokens.shape[1] - 1
        for name in ("route", "mode"):
            shape = tuple(getattr(self, name).shape)
            if shape != (m, length):
                raise ValueError(f"{name} must have shape {(m, length)}, got {shape}")
        for name in ("tokens", "route", "mode"):
            if getattr(self, name).dtype != torch.long:
                raise ValueError(f"{name} must be a LongTensor")
        if len(self.category) != m:
            raise ValueError(f"category must have {m} entries, got {len(self.category)}")
        if self.domain is None:
            self.domain = [""] * m
        elif len(self.domain) != m:
            raise ValueError(f"domain must have {m} entries, got {len(self.domain)}")

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def seq_len(self) -> int:
        """Number of input (and target) positions per sequence."""
        return int(self.tokens.shape[1]) - 1

    @property
    def num_tokens(self) -> int:
        """Number of training (target) tokens."""
        return len(self) * self.seq_len

    @classmethod
    def empty(cls, seq_len: int) -> TokenSequences:
        """No sequences, of the given length."""
        return cls(
            tokens=torch.zeros(0, seq_len + 1, dtype=torch.long),
            route=torch.zeros(0, seq_len, dtype=torch.long),
            mode=torch.zeros(0, seq_len, dtype=torch.long),
            category=[],
            domain=[],
        )

    @classmethod
    def concat(cls, parts: Sequence[TokenSequences], seq_len: int | None = None) -> TokenSequences:
        """Concatenate sequences of equal length (``seq_len`` is needed if ``parts`` is empty)."""
        if not parts:
            if seq_len is None:
                raise ValueError("concat of no parts needs seq_len")
            return cls.empty(seq_len)
        lengths = {p.seq_len for p in parts}
        if len(lengths) != 1 or (seq_len is not None and lengths != {seq_len}):
            raise ValueError(f"cannot concatenate sequences of lengths {sorted(lengths)}")
        return cls(
            tokens=torch.cat([p.tokens for p in parts]),
            route=torch.cat([p.route for p in parts]),
            mode=torch.cat([p.mode for p in parts]),
            category=[c for p in parts for c in p.category],
            domain=[d for p in parts for d in (p.domain or [])],
        )

    def subset(self, index: Sequence[int] | torch.Tensor) -> TokenSequences:
        """The sequences at integer positions ``index`` (in that order)."""
        if isinstance(index, torch.Tensor) and index.dtype == torch.bool:
            raise TypeError("subset takes integer indices, not a boolean mask")
        idx = torch.as_tensor(index, dtype=torch.long).reshape(-1)
        rows = idx.tolist()
        domain = self.domain or [""] * len(self)
        return TokenSequences(
            tokens=self.tokens[idx],
            route=self.route[idx],
            mode=self.mode[idx],
            category=[self.category[i] for i in rows],
            domain=[domain[i] for i in rows],
        )

    def select(self, categories: str | Iterable[str]) -> TokenSequences:
        """The sequences whose category is in ``categories`` (original order)."""
        wanted = {categories} if isinstance(categories, str) else set(categories)
        return self.subset([i for i, c in enumerate(self.category) if c in wanted])

    def by_category(self) -> dict[str, TokenSequences]:
        """Sequences per category present (in :data:`CATEGORIES` order, then others)."""
        present = sorted(set(self.category), key=_category_order)
        return {c: self.select(c) for c in present}

    def by_mode(self) -> dict[int, TokenSequences]:
        """Sequences per forget mode (the mode of each sequence's first position)."""
        if len(self) == 0:
            return {}
        first = self.mode[:, 0]
        return {
            int(m): self.subset(torch.nonzero(first == m).flatten())
            for m in torch.unique(first).tolist()
        }


def _category_order(category: str) -> tuple[int, str]:
    return (CATEGORIES.index(category) if category in CATEGORIES else len(CATEGORIES), category)


def token_counts(seqs: TokenSequences) -> dict[str, int]:
    """Training (target) tokens per category; every name in :data:`CATEGORIES` is present."""
    counts = dict.fromkeys(CATEGORIES, 0)
    for category in seqs.category:
        counts[category] = counts.get(category, 0) + seqs.seq_len
    return counts


def pack_documents(
    docs: Sequence[LabelledDocument],
    seq_len: int,
    seed: int = 0,
    tokenizer: Tokenizer | None = None,
    *,
    token_ids: Sequence[Sequence[int]] | None = None,
) -> TokenSequences:
    """Pack labelled documents into uniform-label sequences of ``seq_len + 1`` tokens.

    Documents are shuffled (seeded), grouped by (route, domain, mode, category), joined
    with an end-of-text token after each, and cut into non-overlapping windows; each
    group's remainder is dropped. The sequences of all groups are then shuffled (seeded),
    so any prefix, also of :meth:`TokenSequences.select`, is a random sample. ``token_ids``
    (one list per document) skips tokenization; else ``tokenizer`` (default: the shipped
    one) is used.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if token_ids is None:
        tok = tokenizer if tokenizer is not None else default_tokenizer()
        token_ids = encode_texts(tok, [d.doc.text for d in docs])
    elif len(token_ids) != len(docs):
        raise ValueError(f"token_ids has {len(token_ids)} entries for {len(docs)} documents")
    rng = stage_rng(seed, PACK)
    order = rng.permutation(len(docs))
    streams: dict[tuple[str, str, int, str], list[np.ndarray]] = {}
    eot = np.array([EOT_ID], dtype=np.int64)
    for i in order.tolist():
        ld = docs[i]
        RouteLabel.parse(ld.route)  # unknown labels fail here
        key = (ld.route, ld.doc.domain, ld.doc.mode, ld.category)
        parts = streams.setdefault(key, [])
        parts.append(np.asarray(token_ids[i], dtype=np.int64))
        parts.append(eot)
    window = seq_len + 1
    pieces: list[TokenSequences] = []

    def group_order(key: tuple[str, str, int, str]) -> tuple[object, ...]:
        route, domain, mode, category = key
        return (_category_order(category), ROUTE_CODES[route], domain, mode)

    for (route, domain, mode, category), parts in sorted(
        streams.items(), key=lambda item: group_order(item[0])
    ):
        stream = np.concatenate(parts)
        n = len(stream) // window
        if n == 0:
            continue
        tokens = torch.from_numpy(stream[: n * window].reshape(n, window).copy())
        pieces.append(
            TokenSequences(
                tokens=tokens,
                route=torch.full((n, seq_len), ROUTE_CODES[route], dtype=torch.long),
                mode=torch.full((n, seq_len), mode, dtype=torch.long),
                category=[category] * n,
                domain=[domain] * n,
            )
        )
    packed = TokenSequences.concat(pieces, seq_len=seq_len)
    return packed.subset(torch.from_numpy(rng.permutation(len(packed))))


class BatchIterator:
    """Deterministic shuffled minibatches of a :class:`TokenSequences`.

    The sequence order is an endless stream of epochs, each a fresh permutation seeded by
    ``(seed, epoch)``; batch ``s`` holds stream positions ``[s * B, (s + 1) * B)``, so a
    batch may span two epochs and every sequence is seen once per epoch. Batch ``s`` depends
    only on ``(seqs, batch_size, seed, s)``: an iterator built with ``start_step=k`` yields
    exactly what a fresh one yields from step ``k``. ``num_steps`` is the total length of
    the run counted from step 0 (``None`` = endless). With ``epochs`` the stream ends after
    exactly that many passes (``num_steps`` is derived; the last batch holds the rest), so
    every sequence is seen exactly ``epochs`` times. Batches are dicts with ``tokens``
    ``[B, L + 1]``, ``route`` ``[B, L]`` and ``mode`` ``[B, L]`` (CPU tensors).
    """

    def __init__(
        self,
        seqs: TokenSequences,
        batch_size: int,
        seed: int = 0,
        start_step: int = 0,
        num_steps: int | None = None,
        shuffle: bool = True,
        epochs: int | None = None,
    ) -> None:
        if len(seqs) == 0:
            raise ValueError("cannot iterate over zero sequences")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        if num_steps is not None and num_steps < 0:
            raise ValueError(f"num_steps must be >= 0, got {num_steps}")
        if epochs is not None:
            if num_steps is not None:
                raise ValueError("give num_steps or epochs, not both")
            if epochs < 1:
                raise ValueError(f"epochs must be >= 1, got {epochs}")
            num_steps = steps_for_epochs(len(seqs), batch_size, epochs)
        self.limit = None if epochs is None else epochs * len(seqs)
        stage_rng(seed, BATCH)  # validates the seed
        self.seqs = seqs
        self.batch_size = batch_size
        self.seed = seed
        self.start_step = start_step
        self.num_steps = num_steps
        self.shuffle = shuffle
        self._perms: dict[int, np.ndarray] = {}

    @property
    def steps_per_epoch(self) -> float:
        """Batches per pass over the data (may be fractional)."""
        return len(self.seqs) / self.batch_size

    def epoch(self, step: int) -> float:
        """Epochs completed at the start of ``step``."""
        return step * self.batch_size / len(self.seqs)

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 4:
                self._perms.pop(min(self._perms))
            n = len(self.seqs)
            self._perms[epoch] = (
                stage_rng(self.seed, BATCH, epoch).permutation(n) if self.shuffle else np.arange(n)
            )
        return self._perms[epoch]

    def indices(self, step: int) -> torch.Tensor:
        """Indices into ``seqs`` of the sequences in batch ``step``."""
        n = len(self.seqs)
        end = (step + 1) * self.batch_size
        if self.limit is not None:
            end = min(end, self.limit)
        positions = np.arange(step * self.batch_size, end)
        epochs, offsets = np.divmod(positions, n)
        out = np.empty(len(positions), dtype=np.int64)
        for e in np.unique(epochs).tolist():
            sel = epochs == e
            out[sel] = self._perm(int(e))[offsets[sel]]
        return torch.from_numpy(out)

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        """Batch number ``step`` (random access)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        idx = self.indices(step)
        return {
            "tokens": self.seqs.tokens[idx],
            "route": self.seqs.route[idx],
            "mode": self.seqs.mode[idx],
        }

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        step = self.start_step
        while self.num_steps is None or step < self.num_steps:
            yield self.batch(step)
            step += 1

    def __len__(self) -> int:
        if self.num_steps is None:
            raise TypeError("an endless BatchIterator has no length")
        return max(0, self.num_steps - self.start_step)


def steps_for_epochs(n_sequences: int, batch_size: int, epochs: int) -> int:
    """Optimizer steps of ``epochs`` exact passes over ``n_sequences`` (last batch partial)."""
    return -(-epochs * n_sequences // batch_size)


def sequential_batches(seqs: TokenSequences, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Batches in order, the last one possibly smaller (for evaluation)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(seqs), batch_size):
        end = start + batch_size
        yield {
            "tokens": seqs.tokens[start:end],
            "route": seqs.route[start:end],
            "mode": seqs.mode[start:end],
        }
