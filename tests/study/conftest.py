"""Tiny study presets: every run trains in well under a second."""

from __future__ import annotations

from pathlib import Path

import pytest

TINY_BASE = """
[base.model]
d_model = 16
n_layer = 1
n_head = 2
seq_len = 16
mlp_width = 32
quarantine_width = 8
vocab_size = 300

[base.data]
max_docs = 40
eval_sequences = 4
hack_samples = 200

[base.train]
steps = {steps}
batch_size = 4
warmup_steps = 1
log_every = 1

[baseline]
forget_tokens = [0, 100, -1]

[measure]
relearn_steps = 4
relearn_eval_every = 2
gradnorm_batches = 1
"""


def write_preset(
    directory: Path,
    variants: list[str],
    seeds: list[int],
    corpora: list[str] | None = None,
    steps: int = 3,
    name: str = "tiny",
    extra: str = "",
) -> Path:
    """A tiny preset file; returns its path."""
    text = f'[study]\nname = "{name}"\n' + TINY_BASE.format(steps=steps)
    text += (
        f"\n[grid]\nvariants = {variants!r}\nseeds = {seeds!r}\nrecalls = [0.5]\n"
        f"corpora = {corpora or ['bilingual']!r}\n" + extra
    ).replace("'", '"')
    path = directory / f"{name}.toml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def preset_writer():
    """:func:`write_preset` itself, for fixtures with a wider scope."""
    return write_preset


@pytest.fixture
def preset_factory(tmp_path):
    def make(*args, **kwargs) -> Path:
        return write_preset(tmp_path, *args, **kwargs)

    return make
