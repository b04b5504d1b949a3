"""Byte-level BPE tokenizers: the shipped default (trained on both embedded languages) and a
deterministic trainer for user data."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import lru_cache
from importlib import resources

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

#: The end-of-text token, appended after every document; always id 0.
EOT_TOKEN = "<|endoftext|>"
EOT_ID = 0
#: Vocabulary size of the shipped default tokenizer.
DEFAULT_VOCAB_SIZE = 2048
TOKENIZER_FILE = "tokenizer.json"


@lru_cache(maxsize=1)
def _default_tokenizer_json() -> str:
    path = resources.files("evil_moe.data") / "embedded" / TOKENIZER_FILE
    return path.read_text(encoding="utf-8")


def default_tokenizer() -> Tokenizer:
    """The shipped byte-level BPE (vocab 2048, ``<|endoftext|>`` = id 0).

    The JSON is read once and cached; each call returns a fresh :class:`Tokenizer`, so
    callers may change its settings (padding, truncation) without affecting others.
    """
    return Tokenizer.from_str(_default_tokenizer_json())


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE on ``texts`` (deterministic for the same texts, in order).

    Every byte is in the initial alphabet, so any text round-trips through
    ``encode``/``decode``. ``<|endoftext|>`` is id :data:`EOT_ID`.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise ValueError(f"vocab_size must be at least {len(alphabet) + 1}, got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT_TOKEN],
        initial_alphabet=sorted(alphabet),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    if tokenizer.token_to_id(EOT_TOKEN) != EOT_ID:  # pragma: no cover - guaranteed by trainer
        raise RuntimeError(f"{EOT_TOKEN} did not get id {EOT_ID}")
    return tokenizer


def encode_texts(tokenizer: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text (no special tokens added), encoded in one parallel batch."""
    if not texts:
        return []
    return [enc.ids for enc in tokenizer.encode_batch(list(texts), add_special_tokens=False)]
