"""Packing, splitting, subsampling, batching and the prepare pipeline."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch

from evil_moe.data.batching import (
    CATEGORIES,
    EVAL_CATEGORIES,
    ROUTE_CODES,
    BatchIterator,
    TokenSequences,
    pack_documents,
    sequential_batches,
    steps_for_epochs,
    token_counts,
)
from evil_moe.data.corpus import Document, embedded_bilingual
from evil_moe.data.monitor import Monitor
from evil_moe.data.prepare import (
    cap_documents,
    prepare_bilingual,
    prepare_documents,
    split_documents,
    subsample_domain,
    subsample_to_share,
)
from evil_moe.data.tokenizer import EOT_ID, default_tokenizer, encode_texts

WORDS = ["the", "cat", "dog", "ran", "sat", "big", "red", "кот", "пёс", "бежал", "сидел", "большой"]


def synthetic(n: int, domain: str, mode: int = -1, seed: int = 0) -> list[Document]:
    g = torch.Generator().manual_seed(seed)
    docs = []
    for i in range(n):
        k = int(torch.randint(3, 40, (1,), generator=g))
        idx = torch.randint(0, len(WORDS), (k,), generator=g).tolist()
        docs.append(Document(f"{i}: " + " ".join(WORDS[j] for j in idx), domain, mode))
    return docs


DOCS = synthetic(300, "en") + synthetic(200, "ru", 0, 1) + synthetic(100, "ru", 1, 2)


def assert_uniform(seqs: TokenSequences) -> None:
    assert seqs.tokens.shape == (len(seqs), seqs.seq_len + 1)
    assert seqs.route.shape == seqs.mode.shape == (len(seqs), seqs.seq_len)
    assert len(seqs.category) == len(seqs.domain or []) == len(seqs)
    assert (seqs.route == seqs.route[:, :1]).all()
    assert (seqs.mode == seqs.mode[:, :1]).all()


def test_pack_shapes_uniform_and_content() -> None:
    labelled = Monitor(recall=0.5, false_positive_rate=0.1).label(DOCS, {"ru"})
    tok = default_tokenizer()
    seqs = pack_documents(labelled, 16, seed=3, tokenizer=tok)
    assert_uniform(seqs)
    assert len(seqs) > 20 and seqs.seq_len == 16
    ids = encode_texts(tok, [ld.doc.text for ld in labelled])
    # every group's sequences are its shuffled stream, cut into windows
    for category in set(seqs.category):
        part = seqs.select(category)
        members = [i for i, ld in enumerate(labelled) if ld.category == category]
        stream_len = sum(len(ids[i]) + 1 for i in members)
        route_mode = {(ld.route, ld.doc.mode) for ld in (labelled[i] for i in members)}
        for r, m in zip(part.route[:, 0].tolist(), part.mode[:, 0].tolist(), strict=True):
            route = next(k for k, v in ROUTE_CODES.items() if v == r)
            assert (route, m) in route_mode
        assert part.num_tokens + len(part) <= stream_len
    assert (seqs.tokens == EOT_ID).sum() > 0
    assert token_counts(seqs)["forget_labeled"] == seqs.select("forget_labeled").num_tokens
    assert set(token_counts(seqs)) == set(CATEGORIES)
    assert sum(token_counts(seqs).values()) == seqs.num_tokens


def test_pack_stream_order() -> None:
    docs = [Document(f"doc number {i}", "en") for i in range(50)]
    labelled = Monitor().label(docs, {"ru"})
    tok = default_tokenizer()
    ids = encode_texts(tok, [d.text for d in docs])
    seqs = pack_documents(labelled, 32, seed=0, token_ids=ids)
    assert len(seqs) == (sum(len(x) + 1 for x in ids)) // 33
    # text between two end-of-text tokens of a window is one whole document
    decoded = []
    for row in seqs.tokens.tolist():
        eots = [j for j, t in enumerate(row) if t == EOT_ID]
        decoded += [tok.decode(row[a + 1 : b]) for a, b in pairwise(eots)]
    assert len(decoded) > 10
    assert set(decoded) <= {doc.text for doc in docs}
    assert decoded != sorted(decoded, key=lambda text: int(text.split()[-1]))
    again = pack_documents(labelled, 32, seed=0, token_ids=ids)
    other = pack_documents(labelled, 32, seed=1, token_ids=ids)
    assert torch.equal(seqs.tokens, again.tokens)
    assert not torch.equal(seqs.tokens, other.tokens)


def test_pack_errors_and_empty() -> None:
    labelled = Monitor().label(DOCS[:3], {"ru"})
    with pytest.raises(ValueError, match="seq_len"):
        pack_documents(labelled, 0)
    with pytest.raises(ValueError, match="token_ids"):
        pack_documents(labelled, 4, token_ids=[[1]])
    empty = pack_documents(labelled, 10_000)
    assert len(empty) == 0 and empty.tokens.shape == (0, 10_001)


def test_token_sequences_helpers() -> None:
    labelled = Monitor(recall=0.5).label(DOCS, {"ru"})
    seqs = pack_documents(labelled, 16)
    parts = seqs.by_category()
    assert list(parts) == [c for c in CATEGORIES if c in parts]
    joined = TokenSequences.concat(list(parts.values()))
    assert sorted(map(tuple, joined.tokens.tolist())) == sorted(map(tuple, seqs.tokens.tolist()))
    assert seqs.category != sorted(seqs.category)  # groups are shuffled together
    modes = seqs.by_mode()
    assert set(modes) == {-1, 0, 1}
    assert sum(len(s) for s in modes.values()) == len(seqs)
    sub = seqs.subset([2, 0])
    assert torch.equal(sub.tokens, seqs.tokens[[2, 0]])
    assert sub.category == [seqs.category[2], seqs.category[0]]
    with pytest.raises(ValueError, match="route"):
        TokenSequences(seqs.tokens, seqs.route[:, :-1], seqs.mode, seqs.category)


def test_split_documents() -> None:
    train, evals = split_documents(DOCS, 0.2, seed=0)
    assert len(train) + len(evals) == len(DOCS)
    assert {id(d) for d in train}.isdisjoint({id(d) for d in evals})
    assert [d for d in DOCS if d in evals] == evals  # input order kept
    for domain, mode, n in (("en", -1, 300), ("ru", 0, 200), ("ru", 1, 100)):
        held = sum(d.domain == domain and d.mode == mode for d in evals)
        assert held == round(0.2 * n)
    assert split_documents(DOCS, 0.2, seed=0) == (train, evals)
    assert split_documents(DOCS, 0.2, seed=1)[1] != evals
    assert split_documents(DOCS[:2], 0.01)[1] != []  # at least one per stratum
    assert split_documents(DOCS, 0.0) == (DOCS, [])
    with pytest.raises(ValueError, match="eval_fraction"):
        split_documents(DOCS, 1.0)


def chars(docs: list[Document], domain: str) -> int:
    return sum(len(d.text) for d in docs if d.domain == domain)


def test_subsample_domain() -> None:
    docs = embedded_bilingual()
    out = subsample_domain(docs, "ru", 0.3, seed=0)
    assert chars(out, "ru") == pytest.approx(0.3 * chars(docs, "ru"), rel=0.01)
    assert [d for d in out if d.domain == "en"] == [d for d in docs if d.domain == "en"]
    assert out == subsample_domain(docs, "ru", 0.3, seed=0)
    assert out != subsample_domain(docs, "ru", 0.3, seed=1)
    by_docs = subsample_domain(DOCS, "ru", 0.25, unit="docs")
    assert sum(d.domain == "ru" for d in by_docs) == 75
    assert subsample_domain(DOCS, "ru", 0.0) == [d for d in DOCS if d.domain == "en"]
    assert subsample_domain(DOCS, "ru", 1.0) == DOCS


@pytest.mark.parametrize("share", [0.0, 0.1, 0.25, 0.75])
def test_subsample_to_share(share: float) -> None:
    docs = embedded_bilingual()
    out = subsample_to_share(docs, {"ru"}, share, seed=0)
    ru, en = chars(out, "ru"), chars(out, "en")
    assert ru / (ru + en) == pytest.approx(share, abs=0.005)
    kept_whole = "en" if share < 0.5 else "ru"
    assert chars(out, kept_whole) == chars(docs, kept_whole)


def test_cap_documents() -> None:
    out = cap_documents(DOCS, 50, seed=0)
    assert sum(d.domain == "en" for d in out) == 50
    assert sum(d.domain == "ru" for d in out) == 50
    assert out == cap_documents(DOCS, 50, seed=0)


def small_seqs() -> TokenSequences:
    return pack_documents(Monitor(recall=0.5).label(DOCS, {"ru"}), 8)


def test_batch_iterator_shapes_and_epochs() -> None:
    seqs = small_seqs()
    m = len(seqs)
    it = BatchIterator(seqs, batch_size=7, seed=0, num_steps=3 * m)
    batches = list(it)
    assert len(batches) == len(it) == 3 * m
    assert batches[0]["tokens"].shape == (7, 9)
    assert batches[0]["route"].shape == batches[0]["mode"].shape == (7, 8)
    # the first m positions of the stream are one permutation of all sequences
    first_epoch = torch.cat([it.indices(s) for s in range(m)])[:m]
    assert sorted(first_epoch.tolist()) == list(range(m))
    assert not torch.equal(first_epoch, torch.arange(m))
    assert it.epoch(m) == pytest.approx(7.0)
    idx = it.indices(5)
    assert torch.equal(batches[5]["tokens"], seqs.tokens[idx])
    assert torch.equal(batches[5]["route"], seqs.route[idx])


@pytest.mark.parametrize(("batch_size", "epochs"), [(7, 1), (7, 3), (5, 2), (1000, 2)])
def test_batch_iterator_epochs_show_every_sequence_exactly_that_often(batch_size, epochs) -> None:
    seqs = small_seqs()
    m = len(seqs)
    it = BatchIterator(seqs, batch_size=batch_size, seed=1, epochs=epochs)
    assert len(it) == steps_for_epochs(m, batch_size, epochs) == -(-epochs * m // batch_size)
    seen = torch.cat([b["tokens"] for b in it])
    assert seen.shape[0] == epochs * m  # the last batch holds the rest
    counts = torch.bincount(torch.cat([it.indices(s) for s in range(len(it))]), minlength=m)
    assert counts.tolist() == [epochs] * m
    with pytest.raises(ValueError, match="not both"):
        BatchIterator(seqs, 4, num_steps=3, epochs=1)
    with pytest.raises(ValueError, match="epochs"):
        BatchIterator(seqs, 4, epochs=0)


def test_batch_iterator_resume_and_determinism() -> None:
    seqs = small_seqs()
    fresh = list(BatchIterator(seqs, 16, seed=4, num_steps=40))
    resumed = list(BatchIterator(seqs, 16, seed=4, start_step=23, num_steps=40))
    assert len(resumed) == 17
    for a, b in zip(fresh[23:], resumed, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in ("tokens", "route", "mode"))
    endless = iter(BatchIterator(seqs, 16, seed=4, start_step=39))
    assert torch.equal(next(endless)["tokens"], fresh[39]["tokens"])
    other = BatchIterator(seqs, 16, seed=5).batch(0)
    assert not torch.equal(other["tokens"], fresh[0]["tokens"])
    ordered = BatchIterator(seqs, 4, shuffle=False).batch(1)
    assert torch.equal(ordered["tokens"], seqs.tokens[4:8])
    with pytest.raises(TypeError):
        len(BatchIterator(seqs, 4))
    tiny = seqs.subset([0, 1, 2])
    assert BatchIterator(tiny, 8).batch(0)["tokens"].shape == (8, 9)  # batch > dataset


def test_sequential_batches() -> None:
    seqs = small_seqs()
    batches = list(sequential_batches(seqs, 10))
    assert torch.equal(torch.cat([b["tokens"] for b in batches]), seqs.tokens)
    assert len(batches[-1]["tokens"]) == len(seqs) - 10 * (len(batches) - 1)


def test_prepare_documents_with_modes() -> None:
    monitor = Monitor(recall={0: 0.8, 1: 0.2}, false_positive_rate=0.05, seed=2)
    data = prepare_documents(DOCS, {"ru"}, seq_len=16, eval_fraction=0.2, monitor=monitor)
    assert_uniform(data.train)
    assert set(data.eval) == set(EVAL_CATEGORIES)
    assert data.train_token_counts == token_counts(data.train)
    assert data.train_token_counts["retain_false_positive"] > 0
    for category, seqs in data.eval.items():
        assert_uniform(seqs)
        assert set(seqs.category) <= {category}
        assert data.eval_token_counts[category] == seqs.num_tokens
    assert set(data.eval["retain"].route[:, 0].tolist()) == {ROUTE_CODES["retain"]}
    labeled = data.eval["forget_labeled"]
    assert set(labeled.route[:, 0].tolist()) == {ROUTE_CODES["forget"]}
    assert set(data.eval["forget_undiscovered"].route[:, 0].tolist()) == {ROUTE_CODES["unlabeled"]}
    train_forget = data.train.select("forget_labeled").by_mode()
    assert len(train_forget[0]) > len(train_forget[1])  # recall 0.8 vs 0.2, 2x the docs
    assert len(data.train_docs) + len(data.eval_docs) == len(DOCS)
    with pytest.raises(TypeError):
        prepare_documents(DOCS, "ru")  # type: ignore[arg-type]


def test_prepare_bilingual_small_deterministic() -> None:
    kwargs = {"seq_len": 32, "eval_fraction": 0.1, "forget_share": 0.25, "max_docs": 300}
    a = prepare_bilingual(**kwargs, monitor=Monitor(recall=0.5, seed=1), seed=3)
    b = prepare_bilingual(**kwargs, monitor=Monitor(recall=0.5, seed=1), seed=3)
    c = prepare_bilingual(**kwargs, monitor=Monitor(recall=0.5, seed=1), seed=4)
    assert torch.equal(a.train.tokens, b.train.tokens)
    assert a.train_token_counts == b.train_token_counts
    assert not torch.equal(a.train.tokens, c.train.tokens)
    counts = a.train_token_counts
    forget = counts["forget_labeled"] + counts["forget_undiscovered"]
    assert forget / (forget + counts["retain"]) == pytest.approx(0.25, abs=0.05)
    assert a.vocab_size == 2048 and a.forget_domains == frozenset({"ru"})


def test_prepare_bilingual_full() -> None:
    data = prepare_bilingual(seq_len=128)
    counts = data.train_token_counts
    assert counts["retain"] > 400_000
    assert counts["forget_labeled"] == pytest.approx(counts["forget_undiscovered"], rel=0.15)
    assert all(len(data.eval[c]) > 100 for c in EVAL_CATEGORIES)
    assert set(data.train.domain or []) == {"en", "ru"}
    ru = [d for d, c in zip(data.train.domain or [], data.train.category, strict=True)]
    assert ru.count("ru") == sum(c.startswith("forget") for c in data.train.category)
