"""From a validated config to data and a model: everything a run needs before step 0.

All failures here happen before anything is written to the output directory.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer

from evil_moe.data.batching import TokenSequences, token_counts
from evil_moe.data.corpus import (
    DataError,
    Document,
    embedded_bilingual,
    load_hf_dataset,
    load_jsonl,
)
from evil_moe.data.monitor import Monitor
from evil_moe.data.prepare import PreparedData, prepare_documents
from evil_moe.data.tokenizer import default_tokenizer, train_tokenizer
from evil_moe.models.testbed import Testbed
from evil_moe.routing.labels import Method, RouteLabel
from evil_moe.train.config import RunConfig

#: (retain domains, forget domains) of the embedded corpora, used when the config names none
CORPUS_DOMAINS = {"bilingual": (["en"], ["ru"]), "hacks": (["honest"], ["hack"])}


@dataclass
class PreparedRun:
    """Data and an initialised model for one config."""

    model: Testbed
    train: TokenSequences
    eval: dict[str, TokenSequences]
    token_counts: dict[str, int]
    tokenizer: Tokenizer
    data: PreparedData
    #: display names of forget modes (for specialisation tables)
    mode_names: dict[int, str]


def resolve_domains(cfg: RunConfig) -> tuple[list[str], list[str]]:
    """The retain and forget domain names, with the embedded corpora's defaults."""
    d = cfg.data
    retain, forget = d.retain_domains, d.forget_domains
    if d.corpus in CORPUS_DOMAINS:
        default_retain, default_forget = CORPUS_DOMAINS[d.corpus]
        retain, forget = retain or default_retain, forget or default_forget
    if not retain or not forget:
        raise DataError(
            f"data.retain_domains and data.forget_domains are required for corpus {d.corpus!r}"
        )
    return retain, forget


def load_documents(cfg: RunConfig) -> list[Document]:
    """The documents a config names (embedded, synthetic, JSONL or Hugging Face)."""
    d = cfg.data
    mode_field = d.mode_field or None
    if d.corpus == "bilingual":
        return embedded_bilingual()
    if d.corpus == "hacks":
        from evil_moe.data.hacks import generate_hack_corpus

        return generate_hack_corpus(d.hack_samples, hack_share=d.hack_share, seed=cfg.train.seed)
    if d.corpus == "jsonl":
        return load_jsonl(d.path, d.text_field, d.domain_field, mode_field)
    return load_hf_dataset(d.path, d.split, d.text_field, d.domain_field, mode_field)


def build_monitor(cfg: RunConfig, docs: list[Document], forget: set[str]) -> Monitor:
    m = cfg.monitor
    recall: float | dict[int, float] = m.recall
    if m.recall_by_mode:
        modes = {doc.mode for doc in docs if doc.domain in forget}
        unknown = sorted(set(m.recall_by_mode) - modes)
        if unknown:
            raise DataError(f"monitor.recall_by_mode names modes {unknown} absent from the data")
        recall = {mode: m.recall_by_mode.get(mode, m.recall) for mode in modes}
    return Monitor(
        recall=recall,
        false_positive_rate=m.false_positive_rate,
        retain_labeled_share=m.retain_labeled_share,
        seed=cfg.train.seed,
    )


def prepare_data(cfg: RunConfig) -> PreparedData:
    """Load, split, label, tokenize and pack the config's data."""
    retain, forget = resolve_domains(cfg)
    docs = load_documents(cfg)
    present = {doc.domain for doc in docs}
    for key, names in (("data.retain_domains", retain), ("data.forget_domains", forget)):
        missing = sorted(set(names) - present)
        if missing:
            raise DataError(f"{key}: unknown domain(s) {missing}; the data has {sorted(present)}")
    docs = [doc for doc in docs if doc.domain in set(retain) | set(forget)]
    tokenizer = default_tokenizer() if cfg.data.corpus == "bilingual" else None
    if tokenizer is None:
        tokenizer = train_tokenizer((doc.text for doc in docs), cfg.model.vocab_size)
    return prepare_documents(
        docs,
        set(forget),
        seq_len=cfg.model.seq_len,
        eval_fraction=cfg.data.eval_fraction,
        forget_share=cfg.data.forget_share,
        monitor=build_monitor(cfg, docs, set(forget)),
        seed=cfg.train.seed,
        tokenizer=tokenizer,
        max_docs=cfg.data.max_docs or None,
    )


def prepare_run(cfg: RunConfig, data: PreparedData | None = None) -> PreparedRun:
    """Data (unless given) and a freshly initialised model, seeded by ``train.seed``."""
    data = data if data is not None else prepare_data(cfg)
    train = data.train
    if cfg.data.forget_token_budget >= 0:
        train = keep_forget_tokens(train, cfg.data.forget_token_budget)
    if cfg.train.method == Method.FILTER:
        keep = (train.route != RouteLabel.FORGET).all(dim=1).nonzero().squeeze(1)
        train = train.subset(keep)
    if len(train) == 0:
        raise DataError("no training sequences: the data is too small for model.seq_len")
    cap = cfg.data.eval_sequences
    evals = {
        c: (s.subset(torch.arange(min(cap, len(s)))) if cap else s) for c, s in data.eval.items()
    }
    counts = token_counts(train)
    if cfg.train.method == Method.FILTER:
        counts = {
            k: v for k, v in counts.items() if k not in ("forget_labeled", "retain_false_positive")
        }
    model_cfg = dataclasses.replace(cfg.model, vocab_size=data.vocab_size)
    torch.manual_seed(cfg.train.seed)
    model = Testbed(model_cfg)
    return PreparedRun(model, train, evals, counts, data.tokenizer, data, mode_names(cfg))


def keep_forget_tokens(seqs: TokenSequences, budget: int) -> TokenSequences:
    """All non-forget-domain sequences plus the first ``budget`` forget-domain tokens.

    Sequences are already in a seeded random order, so a prefix is a random sample.
    """
    forget = torch.tensor([c.startswith("forget") for c in seqs.category], dtype=torch.bool)
    n_forget = budget // seqs.seq_len
    keep_forget = forget.nonzero().squeeze(1)[:n_forget]
    keep = torch.cat([(~forget).nonzero().squeeze(1), keep_forget]).sort().values
    return seqs.subset(keep)


def mode_names(cfg: RunConfig) -> dict[int, str]:
    """Names of the corpus's forget modes (the hack corpus names its hacks)."""
    if cfg.data.corpus == "hacks":
        from evil_moe.data.hacks import HACK_MODES

        return dict(HACK_MODES)
    return {}
