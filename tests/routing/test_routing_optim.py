"""Optimizer leakage: AdamW momentum and weight decay must not move shared parameters on
steps in which no token could train them (SGTM reference trainer's weak point)."""

from __future__ import annotations

import pytest
import torch

from evil_moe.models import testbed as tb
from evil_moe.modules.ablation import parameter_groups, quarantine_parameters
from evil_moe.modules.experts import GateConfig
from evil_moe.routing.labels import RouteLabel
from evil_moe.routing.optim import (
    ParameterGroups,
    StepLedger,
    clip_grad_norm_by_group,
    routed_step,
)
from tiny import tiny_config

EMBEDDINGS = {"wte.weight", "wpe.weight"}


def _setup(**overrides):
    cfg = tiny_config(**{"shared_expert_width": 8} | overrides)
    torch.manual_seed(0)
    model = tb.Testbed(cfg)
    unrouted = set() if cfg.route_embeddings else EMBEDDINGS
    groups = parameter_groups(model, unrouted=unrouted)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    tokens = torch.randint(0, 64, (3, 8), generator=torch.Generator().manual_seed(1))
    return model, groups, opt, tokens


def _backward(model, tokens, label):
    route = torch.full_like(tokens, int(label))
    tb.lm_loss(model(tokens, route), tokens, reduction="sum").backward()
    return route


def _snapshot(model, opt):
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = {
        n: {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
        for n, p in model.named_parameters()
    }
    return params, state


def _two_steps(second_label, release=True, **overrides):
    """Step 1 on unlabeled data (builds momentum); step 2 on ``second_label`` data."""
    model, groups, opt, tokens = _setup(**overrides)
    ledger = StepLedger(groups)
    ledger.record(_backward(model, tokens, RouteLabel.UNLABELED))
    assert ledger.release_idle() == {"shared": False, "quarantine": False}
    opt.step()
    opt.zero_grad(set_to_none=True)
    before = _snapshot(model, opt)
    ledger.record(_backward(model, tokens, second_label))
    skipped = ledger.release_idle() if release else None
    opt.step()
    return model, groups, before, _snapshot(model, opt), skipped


def _names(model, params):
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def _unchanged(before, after, names):
    (pb, sb), (pa, sa) = before, after
    for n in names:
        assert torch.equal(pb[n], pa[n]), f"{n} moved"
        assert sb[n].keys() == sa[n].keys()
        for k in sb[n]:
            assert torch.equal(torch.as_tensor(sb[n][k]), torch.as_tensor(sa[n][k])), f"{n}.{k}"


def _moved(before, after, names):
    for n in names:
        assert not torch.equal(before[0][n], after[0][n]), f"{n} did not move"


def test_parameter_groups_partition():
    model, groups, _, _ = _setup(route_embeddings=False)
    q = set(quarantine_parameters(model))
    assert _names(model, groups.quarantine) == q
    assert _names(model, groups.open_shared) == EMBEDDINGS
    assert (
        _names(model, groups.routed_shared)
        == {n for n, _ in model.named_parameters()} - q - EMBEDDINGS
    )
    assert len(groups.shared) + len(groups.quarantine) == len(list(model.parameters()))


def test_forget_step_leaves_routed_shared_bitwise_unchanged():
    model, groups, before, after, skipped = _two_steps(RouteLabel.FORGET)
    assert skipped == {"shared": True, "quarantine": False}
    _unchanged(before, after, _names(model, groups.routed_shared))
    _moved(before, after, _names(model, groups.quarantine))


def test_without_release_adamw_moves_shared_on_forget_step():
    """Counterfactual (the SGTM reference trainer): grads are exactly zero, yet momentum and
    weight decay move every shared parameter. Proves the test above can fail."""
    model, groups, before, after, _ = _two_steps(RouteLabel.FORGET, release=False)
    for p in groups.routed_shared:
        assert p.grad is not None and bool((p.grad == 0).all())
    _moved(before, after, _names(model, groups.routed_shared))


def test_open_shared_still_train_on_forget_step():
    model, groups, before, after, _ = _two_steps(RouteLabel.FORGET, route_embeddings=False)
    _unchanged(before, after, _names(model, groups.routed_shared))
    _moved(before, after, EMBEDDINGS | _names(model, groups.quarantine))


def test_retain_step_leaves_quarantine_bitwise_unchanged():
    model, groups, before, after, skipped = _two_steps(RouteLabel.RETAIN)
    assert skipped == {"shared": False, "quarantine": True}
    _unchanged(before, after, _names(model, groups.quarantine))
    _moved(before, after, _names(model, groups.routed_shared))


def test_accumulation_forget_then_unlabeled_trains_shared():
    model, groups, opt, tokens = _setup()
    ledger = StepLedger(groups)
    ledger.record(_backward(model, tokens, RouteLabel.FORGET))
    ledger.record(_backward(model, tokens, RouteLabel.UNLABELED))
    accumulated = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert ledger.release_idle() == {"shared": False, "quarantine": False}
    model.zero_grad(set_to_none=True)
    _backward(model, tokens, RouteLabel.UNLABELED)
    # forget micro-batch added exactly nothing to the shared gradients
    for n in _names(model, groups.routed_shared):
        assert torch.equal(accumulated[n], model.get_parameter(n).grad), n
    for n, p in model.named_parameters():
        p.grad = accumulated[n]
    before = _snapshot(model, opt)
    opt.step()
    _moved(before, _snapshot(model, opt), _names(model, groups.routed_shared))


def test_ledger_releases_what_the_labels_do_not_allow():
    model, groups, _, _ = _setup()
    ledger = StepLedger(groups)
    ledger.record(None)  # an unrouted batch trains like unlabeled data
    # no gradient at all: everything idle
    assert ledger.release_idle() == {"shared": True, "quarantine": True}
    # zero gradients of parameters the labels allow are kept: the optimizer steps them
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    ledger.record(torch.tensor([RouteLabel.UNLABELED]))
    assert ledger.release_idle() == {"shared": False, "quarantine": False}
    assert all(p.grad is not None for p in model.parameters())
    # forget only: every routed shared gradient is released, whatever its value
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    ledger.record(["forget", "forget"])
    assert ledger.release_idle() == {"shared": True, "quarantine": False}
    assert all(p.grad is None for p in groups.routed_shared)
    assert all(p.grad is not None for p in groups.quarantine)
    # retain only: the quarantine is released
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    ledger.record(torch.zeros(2, 3, dtype=torch.long))
    assert ledger.release_idle() == {"shared": False, "quarantine": True}
    # the ledger starts afresh after each step: nothing recorded is an error, not a guess
    with pytest.raises(RuntimeError, match="no route labels were recorded"):
        ledger.release_idle()
    # without routing, labels do not matter and nothing is released
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    assert StepLedger(groups, "none").release_idle() == {"shared": False, "quarantine": False}


@pytest.mark.parametrize("semantics", ["demix", "gradient_routing"])
def test_ledger_keeps_exactly_the_reached_parameters_when_forget_trains_some(semantics):
    """Forget tokens train only some shared parameters under DEMix and gradient routing
    (the model's structure decides which): on a forget-only step a shared parameter is
    stepped exactly when its gradient is nonzero."""
    model, groups, _, _ = _setup()
    ledger = StepLedger(groups, semantics)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    first, second = groups.routed_shared[0], groups.routed_shared[1]
    second.grad.view(-1)[0] = 1e-30
    ledger.record([RouteLabel.FORGET])
    ledger.release_idle()
    assert first.grad is None and second.grad is not None
    assert all(p.grad is not None for p in groups.quarantine)  # forget trains the quarantine


def test_a_soft_gate_is_trained_by_every_token():
    """The gate's pin loss trains it on retain tokens: it is never released."""
    model, groups, opt, tokens = _setup(gate=GateConfig(enabled=True, pin_weight=1.0))
    gates = {n for n in _names(model, groups.quarantine) if "gate" in n}
    assert gates and _names(model, groups.open_quarantine) == gates
    ledger = StepLedger(groups)
    route = torch.full_like(tokens, int(RouteLabel.RETAIN))
    loss = tb.lm_loss(model(tokens, route), tokens, reduction="sum")
    (loss + sum(model.aux_losses().values())).backward()
    ledger.record(route)
    before = _snapshot(model, opt)
    assert routed_step(opt, ledger).skipped == ["quarantine"]
    _moved(before, _snapshot(model, opt), gates)
    _unchanged(before, _snapshot(model, opt), _names(model, groups.quarantine) - gates)


def test_routed_step_releases_clips_steps_and_zeroes():
    model, groups, opt, tokens = _setup()
    ledger = StepLedger(groups)
    ledger.record(_backward(model, tokens, RouteLabel.FORGET))
    before = _snapshot(model, opt)
    report = routed_step(opt, ledger, max_norm=1e-3)
    assert report.idle == {"shared": True, "quarantine": False}
    assert report.skipped == ["shared"]
    assert report.grad_norm["shared"] == 0.0 and report.grad_norm["quarantine"] > 1e-3
    assert all(p.grad is None for p in model.parameters())
    after = _snapshot(model, opt)
    _unchanged(before, after, _names(model, groups.routed_shared))
    _moved(before, after, _names(model, groups.quarantine))
    # a zero gradient of a parameter that the labels allow is stepped: AdamW state exists
    ledger.record(_backward(model, tokens, RouteLabel.UNLABELED))
    fresh = groups.routed_shared[0]
    opt.state.pop(fresh)
    fresh.grad.zero_()
    assert routed_step(opt, ledger).grad_norm == {}  # no max_norm: no clipping
    assert opt.state[fresh]["step"] == 1


def test_ledger_keeps_demix_attention_gradient_on_forget_only_steps():
    model, groups, _, tokens = _setup()
    ledger = StepLedger(groups, semantics="demix")
    route = torch.full_like(tokens, int(RouteLabel.FORGET))
    tb.lm_loss(model(tokens, route, semantics="demix"), tokens).backward()
    ledger.record(route)
    ledger.release_idle()
    attn = model.blocks[0].attn.qkv.weight
    core = model.blocks[0].mlp.base_layer.up.weight
    assert attn.grad is not None and bool(attn.grad.any())  # attention trains on forget
    assert core.grad is None  # the core MLP never saw forget tokens: no optimizer step


def test_clip_by_group_does_not_scale_shared_by_quarantine():
    shared = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))]
    quarantine = [torch.nn.Parameter(torch.zeros(4))]
    groups = ParameterGroups(
        routed_shared=shared[:1], open_shared=shared[1:], quarantine=quarantine
    )

    def set_grads():
        shared[0].grad = torch.tensor([0.3, 0.0, 0.4])
        shared[1].grad = torch.tensor([0.0, 0.0])
        quarantine[0].grad = torch.full((4,), 1e6)

    set_grads()
    norms = clip_grad_norm_by_group(groups, max_norm=1.0)
    assert abs(norms["shared"] - 0.5) < 1e-6 and abs(norms["quarantine"] - 2e6) < 1
    assert torch.equal(shared[0].grad, torch.tensor([0.3, 0.0, 0.4]))
    assert abs(float(quarantine[0].grad.norm()) - 1.0) < 1e-4
    # counterfactual: a global clip would shrink the shared update by ~1e-6
    set_grads()
    torch.nn.utils.clip_grad_norm_(shared + quarantine, 1.0)
    assert float(shared[0].grad.norm()) < 1e-5
    # groups without gradients report zero
    for p in shared + quarantine:
        p.grad = None
    assert clip_grad_norm_by_group(groups, 1.0) == {"shared": 0.0, "quarantine": 0.0}
