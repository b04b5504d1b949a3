"""Shared fixtures: tiny run configs that train in about a second on a CPU, and CLI
processes with known signal dispositions."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tiny import TINY_OVERRIDES


@pytest.fixture(autouse=True, scope="module")
def _single_thread_module():
    """Module-scoped fixtures run single-threaded too: on a busy 2-core machine OpenMP
    threads spin and make each tiny op orders of magnitude slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _fixed_threads():
    """Same thread count in every test, so float results are reproducible."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_overrides() -> tuple[str, ...]:
    return tuple(TINY_OVERRIDES)


class CliProcess:
    """``python -m evil_moe.cli.main ARGS`` in a session of its own, with the signal
    dispositions the test asks for (never the ones pytest happened to inherit)."""

    SRC = Path(__file__).resolve().parents[1] / "src"
    # Set the dispositions, then exec the CLI: SIG_IGN / SIG_DFL survive exec.
    LAUNCH = (
        "import os, signal, sys; "
        "signal.signal(signal.SIGINT, getattr(signal, sys.argv[1])); "
        "signal.signal(signal.SIGTERM, signal.SIG_DFL); "
        "os.execv(sys.executable, [sys.executable, '-m', 'evil_moe.cli.main', *sys.argv[2:]])"
    )

    def __init__(self, args: list[str], sigint_ignored: bool = False):
        env = {**os.environ, "PYTHONPATH": str(self.SRC)}
        sigint = "SIG_IGN" if sigint_ignored else "SIG_DFL"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", self.LAUNCH, sigint, *args],
            env=env,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.pgid = self.proc.pid

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = 120) -> None:
        """Poll until ``condition()`` holds; fails if the process ends first."""
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.proc.poll() is None, f"the command ended before {what}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.02)

    def signal_group(self, signum: int) -> None:
        os.killpg(self.pgid, signum)

    def finish(self, timeout: float = 120) -> tuple[int, str]:
        """Exit status and stderr, once the command has ended."""
        _, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, err

    def live_group_members(self) -> list[int]:
        """Processes of the command's process group that are still running (not zombies)."""
        members = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == self.pgid and fields[0] != "Z":
                members.append(int(stat.parent.name))
        return members

    def wait_group_gone(self, timeout: float = 30) -> None:
        """Wait until nothing of the command (workers, helpers) runs any more."""
        deadline = time.monotonic() + timeout
        while self.live_group_members():
            assert time.monotonic() < deadline, f"left behind: {self.live_group_members()}"
            time.sleep(0.02)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, signal.SIGKILL)
        self.proc.wait(timeout=30)


@dataclass(frozen=True)
class StopCase:
    """A stop signal, how the command is started, and what it must answer."""

    signum: int
    sigint_ignored: bool
    code: int
    word: str


@pytest.fixture(
    params=[
        StopCase(signal.SIGINT, True, 130, "interrupted"),  # also when SIGINT was ignored
        StopCase(signal.SIGTERM, False, 143, "terminated"),
    ],
    ids=["sigint-inherited-ignored", "sigterm"],
)
def stop_case(request) -> StopCase:
    """Each way of stopping a CLI command cleanly."""
    return request.param


@pytest.fixture
def cli_process():
    """Start CLI commands as :class:`CliProcess`; whatever is left is killed at teardown."""
    if not Path("/proc/self/stat").exists():
        pytest.skip("needs /proc (Linux)")
    started: list[CliProcess] = []

    def start(args: list[str], sigint_ignored: bool = False) -> CliProcess:
        started.append(CliProcess(args, sigint_ignored))
        return started[-1]

    yield start
    for process in started:
        process.kill()
