"""Fixtures of the RL tests (helpers live in ``rl_helpers``)."""

from __future__ import annotations

import pytest

pytest.importorskip("trl")

from rl_helpers import TINY_RL


@pytest.fixture(scope="session")
def tiny_rl() -> list[str]:
    return list(TINY_RL)
