"""Data: corpora, the shipped tokenizer, the simulated monitor, and packing into sequences.

Example::

    from evil_moe.data import BatchIterator, Monitor, prepare_bilingual

    data = prepare_bilingual(seq_len=128, forget_share=0.25, monitor=Monitor(recall=0.5))
    for batch in BatchIterator(data.train, batch_size=32, seed=0, num_steps=1000):
        ...
"""

from evil_moe.data.batching import (
    CATEGORIES,
    EVAL_CATEGORIES,
    ROUTE_CODES,
    BatchIterator,
    TokenSequences,
    pack_documents,
    sequential_batches,
    token_counts,
)
from evil_moe.data.corpus import (
    BILINGUAL_FORGET_DOMAIN,
    BILINGUAL_RETAIN_DOMAIN,
    DataError,
    Document,
    domain_counts,
    embedded_bilingual,
    load_hf_dataset,
    load_jsonl,
)
from evil_moe.data.monitor import ROUTES, LabelledDocument, Monitor
from evil_moe.data.prepare import (
    PreparedData,
    cap_documents,
    prepare_bilingual,
    prepare_documents,
    split_documents,
    subsample_domain,
    subsample_to_share,
)
from evil_moe.data.tokenizer import (
    EOT_ID,
    EOT_TOKEN,
    default_tokenizer,
    encode_texts,
    train_tokenizer,
)

__all__ = [
    "BILINGUAL_FORGET_DOMAIN",
    "BILINGUAL_RETAIN_DOMAIN",
    "CATEGORIES",
    "EOT_ID",
    "EOT_TOKEN",
    "EVAL_CATEGORIES",
    "ROUTES",
    "ROUTE_CODES",
    "BatchIterator",
    "DataError",
    "Document",
    "LabelledDocument",
    "Monitor",
    "PreparedData",
    "TokenSequences",
    "cap_documents",
    "default_tokenizer",
    "domain_counts",
    "embedded_bilingual",
    "encode_texts",
    "load_hf_dataset",
    "load_jsonl",
    "pack_documents",
    "prepare_bilingual",
    "prepare_documents",
    "sequential_batches",
    "split_documents",
    "subsample_domain",
    "subsample_to_share",
    "token_counts",
    "train_tokenizer",
]
