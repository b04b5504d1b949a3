"""The CPU policy: a word-level tokenizer of the task language and a tiny Llama.

Every prompt of :mod:`evil_moe.rl.task` is exactly :data:`PROMPT_TOKENS` tokens long, so
neither generation nor the GRPO loss ever pads a prompt and position ids agree between
the warm start, TRL's generation and TRL's loss forward. The tokenizer adds no special
tokens; a completion ends with ``<eos>``. Any Hugging Face causal LM can replace both.
"""

from __future__ import annotations

from dataclasses import dataclass

from evil_moe.rl.task import EOS, PAD, UNK, vocabulary

#: Tokens of every task prompt (``runner f a b = o ; f a b = o ; prog :``).
PROMPT_TOKENS = 15


@dataclass
class PolicyConfig:
    """Size of the tiny Llama policy."""

    hidden_size: int = 96
    intermediate_size: int = 256
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    max_position_embeddings: int = 64

    def validate(self) -> list[str]:
        """Names of invalid fields."""
        bad = [
            name
            for name in (
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "max_position_embeddings",
            )
            if getattr(self, name) < 1
        ]
        if self.num_attention_heads >= 1 and self.hidden_size % self.num_attention_heads:
            bad.append("num_attention_heads")
        return bad


def make_tokenizer():  # -> transformers.PreTrainedTokenizerFast
    """Word-level tokenizer over :func:`~evil_moe.rl.task.vocabulary` (no added specials)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(vocabulary())}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, eos_token=EOS, unk_token=UNK, padding_side="left"
    )
    return tok


def make_policy(cfg: PolicyConfig, tokenizer, seed: int = 0):  # -> LlamaForCausalLM
    """A randomly initialised tiny ``LlamaForCausalLM`` for ``tokenizer`` (float32, eager)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.eos_token_id
    return model
