"""Specialisation metrics of K quarantine experts: NMI, routing statistics, ablation matrix."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from evil_moe.data.batching import TokenSequences
from evil_moe.eval.specialization import (
    COLLAPSE_SHARE,
    coefficient_of_variation,
    normalized_mutual_information,
    routing_statistics,
    specialization_report,
)
from evil_moe.models import testbed as tb
from evil_moe.routing.routers import BackwardRouter, RouterConfig

# -- normalised mutual information -----------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3, 5])
def test_nmi_of_a_permutation_is_one(n):
    perm = np.eye(n)[np.random.default_rng(n).permutation(n)] * 7
    assert normalized_mutual_information(perm) == pytest.approx(1.0, abs=1e-12)


def test_nmi_of_independent_rows_and_columns_is_zero():
    assert normalized_mutual_information(np.outer([1, 2, 3], [4, 5])) == pytest.approx(0, abs=1e-12)
    assert normalized_mutual_information(np.ones((4, 4))) == pytest.approx(0, abs=1e-12)
    # one side constant, or no mass at all
    assert normalized_mutual_information(np.array([[3.0, 0.0], [5.0, 0.0]])) == 0.0
    assert normalized_mutual_information(np.zeros((2, 2))) == 0.0


def test_nmi_of_a_mixed_table_by_hand():
    counts = np.array([[2.0, 1.0], [1.0, 2.0]])
    # p = [[1/3, 1/6], [1/6, 1/3]], uniform marginals (entropy ln 2 each)
    mi = 2 * (1 / 3) * math.log((1 / 3) / (1 / 4)) + 2 * (1 / 6) * math.log((1 / 6) / (1 / 4))
    nmi = normalized_mutual_information(counts)
    assert nmi == pytest.approx(mi / math.log(2), abs=1e-12)
    assert 0 < nmi < 1
    assert normalized_mutual_information(counts.T) == pytest.approx(nmi, abs=1e-15)
    # more diagonal mass, more information
    sharper = normalized_mutual_information(np.array([[9.0, 1.0], [1.0, 9.0]]))
    assert nmi < sharper < 1


def test_coefficient_of_variation():
    assert coefficient_of_variation(np.array([100.0, 0, 0, 0])) == pytest.approx(math.sqrt(3))
    assert coefficient_of_variation(np.array([5.0, 5, 5])) == 0.0
    assert coefficient_of_variation(np.zeros(3)) == 0.0


# -- routing statistics from the routers' counters -------------------------------------------


def _feed(router: BackwardRouter, preferred: list[int], modes: list[int]) -> None:
    """One decide() call in which token ``t`` strongly prefers expert ``preferred[t]``."""
    n, k = len(preferred), router.n_experts
    scores = torch.full((n, k), -1.0)
    scores[torch.arange(n), torch.tensor(preferred)] = 1.0
    grad = torch.zeros(n, 2)
    grad[:, 0] = 1.0
    router.decide(
        -scores, grad, torch.ones(n), torch.ones(n, dtype=torch.bool), torch.tensor(modes)
    )


def test_routing_statistics_detects_a_collapsed_layer():
    collapsed = BackwardRouter(4, policy="topk")
    healthy = BackwardRouter(4, policy="topk")
    _feed(collapsed, [0] * 100, [0] * 50 + [1] * 50)
    _feed(healthy, [0, 1, 2, 3] * 25, [0, 1, 0, 1] * 25)
    half_dead = BackwardRouter(4, policy="topk")  # no expert above 90%, but two dead ones
    _feed(half_dead, [0, 1] * 10, [-1] * 20)
    model = nn.ModuleList([collapsed, healthy, half_dead])
    assert routing_statistics(model)["collapsed_layers"] == [0, 2]
    assert routing_statistics(model)["dead_experts"] == 5
    stats = routing_statistics(nn.ModuleList([collapsed, healthy]), {0: "a", 1: "b"})
    assert stats["policy"] == "topk"
    assert stats["layers"][0]["load"] == [100.0, 0.0, 0.0, 0.0]
    assert stats["layers"][0]["dead_experts"] == 3
    assert stats["layers"][0]["max_share"] == 1.0
    assert stats["layers"][0]["cv"] == pytest.approx(math.sqrt(3))
    assert stats["layers"][1]["load"] == [25.0] * 4
    assert stats["layers"][1]["cv"] == 0.0 and stats["layers"][1]["dead_experts"] == 0
    assert stats["collapsed_layers"] == [0]
    assert stats["dead_experts"] == 3
    assert stats["load"] == [125.0, 25.0, 25.0, 25.0]
    assert stats["cv"] == pytest.approx(coefficient_of_variation(np.array([125.0, 25, 25, 25])))
    assert stats["routed_tokens"] == 200 and stats["dropped_share"] == 0.0
    # modes a, b: layer 0 sends both to q0, layer 1 sends a to q0/q2 and b to q1/q3
    assert stats["mode_expert_counts"] == {
        "a": [75.0, 0.0, 25.0, 0.0],
        "b": [50.0, 25.0, 0.0, 25.0],
    }
    assert 0 < stats["nmi_mode_expert"] < 1
    assert 0 < stats["routing_entropy"] < stats["max_entropy"] == pytest.approx(math.log(4))


def test_routing_statistics_counts_dropped_and_amplified_tokens():
    router = BackwardRouter(2, policy="expert_choice", amplify_threshold=0.5)
    n = 4
    scores = torch.tensor([[0.5, 0.4], [0.6, 0.3], [0.1, 0.0], [-0.5, -0.5]])
    grad = torch.zeros(n, 2)
    grad[:, 0] = 1.0
    routed = torch.tensor([True, False, True, False])  # token 1 is amplified (0.9 > 0.5)
    router.decide(-scores, grad, torch.ones(n), routed, None)
    stats = routing_statistics(nn.Sequential(router))
    assert stats["amplified_tokens"] == 1
    assert stats["routed_tokens"] == 3
    # capacity ceil(3 / 2) = 2 per expert among 3 routed tokens: at most one dropped
    assert stats["dropped_share"] == pytest.approx(float(router.dropped_tokens) / 3)
    assert stats["nmi_mode_expert"] is None  # no modes recorded


def test_routing_statistics_without_routers():
    assert routing_statistics(nn.Linear(2, 2)) is None


# -- ablation matrix and the report on a tiny testbed ----------------------------------------


def _tiny_model(router: str = "topk", seed: int = 0) -> tb.Testbed:
    cfg = tb.TestbedConfig(
        vocab_size=16,
        seq_len=6,
        d_model=8,
        n_layer=1,
        n_head=2,
        mlp_width=16,
        quarantine_width=4,
        n_experts=2,
        router=RouterConfig(policy=router),
    )
    torch.manual_seed(seed)
    return tb.Testbed(cfg)


def _sequences(n: int, mode: int, category: str, seed: int) -> TokenSequences:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 16, (n, 7), generator=gen)
    route = torch.full((n, 6), 0 if category == "retain" else 1)
    return TokenSequences(
        tokens=tokens,
        route=route,
        mode=torch.full((n, 6), mode),
        category=[category] * n,
    )


def _rows():
    return {
        "retain": _sequences(3, -1, "retain", 1).tokens,
        "mode0": _sequences(3, 0, "forget_labeled", 2).tokens,
        "mode1": _sequences(3, 1, "forget_labeled", 3).tokens,
    }


def _eval_sets():
    return {
        "retain": _sequences(2, -1, "retain", 1),
        "forget_labeled": TokenSequences.concat(
            [_sequences(2, 0, "forget_labeled", 2), _sequences(2, 1, "forget_labeled", 3)]
        ),
        "forget_undiscovered": _sequences(2, 1, "forget_undiscovered", 4),
    }


def test_specialization_report_warns_on_collapse():
    model = _tiny_model()
    router = model.blocks[0].mlp.router
    _feed(router, [1] * 20, [0] * 20)
    report = specialization_report(model, _eval_sets(), 2, {0: "a", 1: "b"}, batch_size=2)
    assert report["n_experts"] == 2
    assert report["routing"]["collapsed_layers"] == [0]
    assert len(report["warnings"]) == 1 and "collapse" in report["warnings"][0]
    assert report["ablation"]["rows"] == ["retain", "a", "b"]
    assert report["ablation"]["units"] == ["blocks.0.mlp.experts.q0", "blocks.0.mlp.experts.q1"]
    assert report["cancellation"]["mean"] >= 1.0
    assert f"{COLLAPSE_SHARE:.0%}" in report["warnings"][0]


def test_specialization_report_is_quiet_when_balanced():
    model = _tiny_model()
    router = model.blocks[0].mlp.router
    _feed(router, [0, 1] * 10, [0, 1] * 10)
    report = specialization_report(model, _eval_sets(), 2, {0: "a", 1: "b"}, batch_size=2)
    assert report["routing"]["collapsed_layers"] == []
    assert report["warnings"] == []
    assert report["routing"]["nmi_mode_expert"] == pytest.approx(1.0)
    # no routers (policy "all"): no routing statistics and no warning
    report = specialization_report(_tiny_model("all"), _eval_sets(), 2, batch_size=2)
    assert report["routing"] is None and report["warnings"] == []
