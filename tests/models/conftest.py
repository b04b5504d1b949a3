"""Run these tiny-tensor tests single-threaded: on a busy 2-core machine OpenMP threads
spin and make each tiny op orders of magnitude slower."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
