"""RoutedGRPOTrainer: exact routed GRPO loss, forget-only steps, labels through TRL's pipeline."""

from __future__ import annotations

import random

import pytest
import torch
from rl_helpers import tiny_policy, tiny_trainer

from evil_moe.rl.task import make_task
from evil_moe.rl.trainer import RoutedGRPOTrainer, routed_optimizer_step
from evil_moe.routing.labels import RouteLabel

FORGET, UNLABELED = int(RouteLabel.FORGET), int(RouteLabel.UNLABELED)


def _inputs(tok, flagged: list[bool], seed: int = 0) -> dict[str, torch.Tensor]:
    """A hand-made GRPO batch: task prompts, random completions of ragged length."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    b = len(flagged)
    prompts = torch.tensor([tok(make_task(rng).prompt)["input_ids"] for _ in range(b)])
    completion = torch.randint(3, len(tok), (b, 6), generator=gen)
    lengths = torch.randint(2, 7, (b,), generator=gen)
    mask = (torch.arange(6)[None, :] < lengths[:, None]).to(torch.long)
    return {
        "prompt_ids": prompts,
        "prompt_mask": torch.ones_like(prompts),
        "completion_ids": completion,
        "completion_mask": mask,
        "advantages": torch.randn(b, generator=gen, dtype=torch.float64).float(),
        "num_items_in_batch": mask.sum(),
        "route_labels": torch.tensor([FORGET if f else UNLABELED for f in flagged]),
    }


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
        for n, p in model.named_parameters()
    }


def _backward(trainer: RoutedGRPOTrainer, inputs: dict) -> tuple[float, dict[str, torch.Tensor]]:
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    return float(loss.detach()), _grads(trainer.model)


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_routed_loss_equals_separate_backward_passes_per_label_group(beta: float) -> None:
    model, handle, tok = tiny_policy(dtype=torch.float64)
    trainer = tiny_trainer(model, handle, tok, "sgtm", monitor=lambda **kw: [])
    trainer.beta = beta
    flagged = [True, False, False, True, False, True, False, False]
    inputs = _inputs(tok, flagged)
    if beta:
        with torch.no_grad():
            inputs["ref_per_token_logps"] = -torch.rand(8, 6, dtype=torch.float64)
    loss, routed = _backward(trainer, inputs)

    plain = {k: v for k, v in inputs.items() if k != "route_labels"}
    rows = torch.tensor(flagged)[:, None].to(torch.long)
    ref_loss_u, unflagged = _backward(trainer, {**plain, "tool_mask": (1 - rows).expand(-1, 6)})
    ref_loss_f, from_flagged = _backward(trainer, {**plain, "tool_mask": rows.expand(-1, 6)})
    quarantine = set(handle.quarantine_parameters())
    assert quarantine and len(quarantine) < len(routed)
    assert loss == pytest.approx(ref_loss_u + ref_loss_f, rel=1e-12, abs=1e-12)  # forward unchanged
    for name, g in routed.items():
        expected = unflagged[name] + from_flagged[name] if name in quarantine else unflagged[name]
        assert torch.allclose(g, expected, rtol=1e-9, atol=1e-13), name
    moved_by_flagged = [n for n in routed if n not in quarantine and bool(from_flagged[n].any())]
    assert moved_by_flagged, (
        "the reference must show that flagged rows reach shared weights unrouted"
    )


def test_forget_only_step_leaves_shared_parameters_and_optimizer_state_unchanged() -> None:
    model, handle, tok = tiny_policy()
    trainer = tiny_trainer(model, handle, tok, "sgtm", monitor=lambda **kw: [])
    opt = trainer.optimizer
    mixed = _inputs(tok, [True, False, True, False, False, True, False, False], seed=1)
    trainer._compute_loss(model, mixed).backward()
    routed_optimizer_step(trainer.route_ledger, opt, 1.0)
    opt.zero_grad(set_to_none=True)

    quarantine = {id(p) for p in handle.quarantine_parameters().values()}
    shared = {n: p for n, p in model.named_parameters() if id(p) not in quarantine}
    before = {n: p.detach().clone() for n, p in shared.items()}
    state_before = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in shared.items()}
    assert all(state_before.values()), "the mixed step must have built optimizer state"
    q_before = {n: p.detach().clone() for n, p in handle.quarantine_parameters().items()}

    forget_only = _inputs(tok, [True] * 8, seed=2)
    trainer._compute_loss(model, forget_only).backward()
    report = routed_optimizer_step(trainer.route_ledger, opt, 1.0)
    assert report["skipped"] == ["shared"]
    for n, p in shared.items():
        assert torch.equal(p, before[n]), n
        assert all(torch.equal(opt.state[p][k], v) for k, v in state_before[n].items()), n
    changed = [
        n for n, p in handle.quarantine_parameters().items() if not torch.equal(p, q_before[n])
    ]
    assert len(changed) == len(q_before)


def _flag_by_text(prompts, completions, **_):
    return [len(c) % 2 == 1 for c in completions]  # deterministic in the completion text


@pytest.mark.parametrize("method", ["penalty", "filter", "sgtm"])
def test_labels_follow_their_completions_through_trl(method: str) -> None:
    model, handle, tok = tiny_policy()
    trainer = tiny_trainer(model, handle, tok, method, monitor=_flag_by_text)
    rng = random.Random(3)
    tasks = [make_task(rng) for _ in range(2)]
    batch = [{"prompt": t.prompt, "task": t.to_dict()} for t in tasks for _ in range(4)]
    torch.manual_seed(0)
    model.train()
    inputs = trainer._prepare_inputs(batch)  # generation, scoring, shuffling
    texts = tok.batch_decode(
        [
            ids[m.bool()]
            for ids, m in zip(inputs["completion_ids"], inputs["completion_mask"], strict=True)
        ],
        skip_special_tokens=True,
    )
    expected = torch.tensor([FORGET if f else UNLABELED for f in _flag_by_text(None, texts)])
    assert torch.equal(inputs["route_labels"], expected)
    flagged = trainer.last_batch["flagged"]
    if method == "penalty":
        assert bool((trainer.last_batch["rewards"][flagged] == 0).all())
    if method == "filter" and bool(expected.eq(FORGET).any()):
        rows = inputs["tool_mask"].sum(1) == 0
        assert torch.equal(rows, expected == FORGET)


def test_grpo_step_runs_and_reports() -> None:
    model, handle, tok = tiny_policy()
    trainer = tiny_trainer(model, handle, tok, "sgtm", monitor=_flag_by_text)
    rng = random.Random(4)
    batch = [
        {"prompt": t.prompt, "task": t.to_dict()}
        for t in (make_task(rng), make_task(rng))
        for _ in range(4)
    ]
    torch.manual_seed(0)
    metrics = trainer.grpo_step(batch)
    assert set(metrics["grad_norm"]) == {"shared", "quarantine"}
    assert 0.0 <= metrics["flagged_share"] <= 1.0
    assert trainer.state.global_step == 1


def test_constructor_checks() -> None:
    model, handle, tok = tiny_policy()
    base = tiny_trainer(model, handle, tok, "none")
    same = {"train_dataset": base.train_dataset, "processing_class": tok, "quarantine": handle}
    with pytest.raises(ValueError, match="needs a monitor"):
        RoutedGRPOTrainer(model, base.reward_funcs, base.args, method="sgtm", **same)
    with pytest.raises(ValueError, match="unknown method"):
        RoutedGRPOTrainer(
            model, base.reward_funcs, base.args, method="demix", monitor=_flag_by_text, **same
        )
    with pytest.raises(ValueError, match="semantics"):
        tiny_trainer(model, handle, tok, "gradient_routing", monitor=_flag_by_text)


def test_copies_of_a_trained_policy_compute_with_their_own_weights() -> None:
    """TRL patches ``forward`` with a closure over the original; copies must not use it."""
    from evil_moe.models.hf import get_handle
    from evil_moe.rl.trainer import deployed_copy, independent_copy

    model, handle, tok = tiny_policy()
    trainer = tiny_trainer(model, handle, tok, "none")  # patches model.forward
    assert "forward" in model.__dict__
    ids = torch.tensor([tok(make_task(random.Random(5)).prompt)["input_ids"]])
    with torch.no_grad():
        live = model(input_ids=ids).logits
        with handle.ablated():
            deployed = model(input_ids=ids).logits
        clone = independent_copy(trainer.model)
        get_handle(clone).ablate()
        ref = deployed_copy(trainer.model)
        assert not torch.allclose(live, deployed)
        assert torch.equal(clone(input_ids=ids).logits, deployed)
        assert torch.equal(ref(input_ids=ids).logits, deployed)
        assert torch.equal(model(input_ids=ids).logits, live)  # the original is untouched
