"""The simulated monitor's recall and false-positive rate; the group baseline option."""

from __future__ import annotations

import math

import pytest
import torch

from evil_moe.rl.monitor import SimulatedMonitor, TaskReward
from evil_moe.rl.task import MODES, Task
from evil_moe.rl.trainer import as_flags, group_advantages, resolve_baseline

N = 20_000


def _share(flags: list[bool]) -> float:
    return sum(flags) / len(flags)


def _within(share: float, p: float, n: int = N) -> bool:
    return abs(share - p) <= 4 * math.sqrt(p * (1 - p) / n) + 1e-12


def test_recall_per_mode_never_flagged_and_false_positives() -> None:
    monitor = SimulatedMonitor(
        recall=0.5,
        recall_by_mode={"skip_checks": 0.9},
        never_flagged=("special_case_tests",),
        false_positive_rate=0.05,
        seed=3,
    )
    expected = {
        "hardcode_outputs": 0.5,
        "special_case_tests": 0.0,
        "skip_checks": 0.9,
        "always_equal": 0.5,
    }
    for step, (mode, p) in enumerate(expected.items()):
        flags = monitor.flags([mode] * N, step=step)
        assert _within(_share(flags), p), (mode, _share(flags))
    assert not any(monitor.flags(["special_case_tests"] * N, step=9))
    assert _within(_share(monitor.flags([None] * N, step=11)), 0.05)


def test_monitor_is_seeded_by_step() -> None:
    monitor = SimulatedMonitor(recall=0.5, seed=1)
    modes = ["hardcode_outputs"] * 200
    assert monitor.flags(modes, step=4) == monitor.flags(modes, step=4)
    assert monitor.flags(modes, step=4) != monitor.flags(modes, step=5)
    assert monitor.flags(modes, step=4) != SimulatedMonitor(recall=0.5, seed=2).flags(modes, step=4)


def test_monitor_grades_completions_itself() -> None:
    task = Task(
        "loose", "add", ((3, 4, 7), (2, 6, 8)), ((1, 1, 2), (0, 9, 9), (5, 5, 10), (9, 1, 10))
    )
    monitor = SimulatedMonitor(recall=1.0, false_positive_rate=0.0)
    flags = monitor(
        ["p"] * 3, ["ret add", "ret any", "if 3 4 ret 7 ; ret mul"], task=[task.to_dict()] * 3
    )
    assert flags == [False, True, False]
    reward = TaskReward()
    assert reward(["p"] * 2, ["ret any", "junk ;"], task=[task.to_dict()] * 2) == [1.0, 0.0]
    assert reward.grading_errors == 1


@pytest.mark.parametrize(
    "kwargs", [{"recall": 1.5}, {"false_positive_rate": -0.1}, {"never_flagged": ("nope",)}]
)
def test_monitor_rejects_bad_settings(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        SimulatedMonitor(**kwargs)


def test_as_flags() -> None:
    assert as_flags([True, False, "forget", "unlabeled", 1, 2]) == [
        True,
        False,
        True,
        False,
        True,
        False,
    ]
    with pytest.raises(ValueError, match="retain"):
        as_flags(["retain"])
    with pytest.raises(ValueError):
        as_flags([0])


def _trl_advantages(rewards: torch.Tensor, g: int) -> torch.Tensor:
    """TRL 1.16's group-scaled advantages, written out as in ``_generate_and_score_completions``."""
    from trl.trainer.utils import nanstd

    mean = torch.nanmean(rewards.view(-1, g), dim=1).repeat_interleave(g)
    std = nanstd(rewards.view(-1, g), dim=1).repeat_interleave(g)
    return torch.nan_to_num((rewards - mean) / (std + 1e-4), nan=0.0)


def test_all_baseline_is_trl() -> None:
    gen = torch.Generator().manual_seed(0)
    rewards = (torch.rand(48, generator=gen) * 4).round() / 4
    flagged = torch.rand(48, generator=gen) < 0.3
    ours = group_advantages(rewards, flagged, 8, "all")
    assert torch.allclose(ours, _trl_advantages(rewards, 8), atol=1e-6)
    unscaled = group_advantages(rewards, flagged, 8, "all", scale=False)
    assert torch.allclose(
        unscaled, rewards - rewards.view(-1, 8).mean(1).repeat_interleave(8), atol=1e-6
    )


def test_unflagged_baseline_ignores_flagged_rewards() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.5, 0.0])
    flagged = torch.tensor([True, False, False, True, True, False, False, False])
    other = rewards.clone()
    other[flagged] = torch.tensor([0.0, 0.25, 0.0])  # change only flagged completions' rewards
    for baseline, changes in (("unflagged", False), ("all", True)):
        a = group_advantages(rewards, flagged, 8, baseline)[~flagged]
        b = group_advantages(other, flagged, 8, baseline)[~flagged]
        assert (not torch.allclose(a, b)) == changes, baseline
    adv = group_advantages(rewards, flagged, 8, "unflagged", scale=False)
    unflagged_mean = rewards[~flagged].mean()
    assert torch.allclose(adv[~flagged], rewards[~flagged] - unflagged_mean)
    assert torch.allclose(adv[flagged], rewards[flagged] - rewards.mean())  # flagged: whole group


def test_a_lone_unflagged_completion_gets_zero_advantage() -> None:
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0])
    flagged = torch.tensor([True, True, True, False])
    adv = group_advantages(rewards, flagged, 4, "unflagged")
    assert adv[3] == 0.0 and bool((adv[:3] > 0).all())


def test_auto_baseline() -> None:
    assert resolve_baseline("none", "auto") == resolve_baseline("penalty", "auto") == "all"
    for method in ("filter", "sgtm", "gradient_routing"):
        assert resolve_baseline(method, "auto") == "unflagged"
    assert resolve_baseline("sgtm", "all") == "all"
    with pytest.raises(ValueError):
        resolve_baseline("sgtm", "both")


def test_modes_cover_the_hack_corpus() -> None:
    from evil_moe.data.hacks import HACK_MODES

    assert tuple(HACK_MODES.values()) == MODES
