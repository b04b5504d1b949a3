"""Run by Ray workers in the Ray executor's tests (importable through ``PYTHONPATH``)."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from evil_moe.study.worker import execute_run

#: the directory (set in the test's Ray instance) where the killed task leaves its mark
MARKERS = "EVIL_MOE_TEST_MARKERS"


def killed_once(task: dict[str, Any]) -> dict[str, Any]:
    """The first task to start kills its own worker process (SIGKILL, mid-run), after
    writing its key to ``$MARKERS/killed``; Ray retries it, and every other task (and the
    retry) runs normally. Exactly one kill, whatever the timing."""
    marker = Path(os.environ[MARKERS]) / "killed"
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return execute_run(task)
    os.write(fd, task["key"].encode())
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("unreachable")
