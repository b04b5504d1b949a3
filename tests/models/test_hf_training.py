"""Route labels through ordinary training loops: gradient checkpointing, accumulation,
bf16 autocast, the step ledger, the collator and the Trainer integration."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch.testing import assert_close

transformers = pytest.importorskip("transformers")

from test_hf import (  # noqa: E402
    FORGET,
    RETAIN,
    UNLABELED,
    VOCAB,
    base_model,
    batch,
    grads,
    loss_sum,
    make,
    shared_names,
)

from evil_moe.models.hf import (  # noqa: E402
    ROUTE_KEYS,
    RoutedTrainerMixin,
    RouteLabelCollator,
    inject,
    route_labels,
)
from evil_moe.modules.ablation import quarantine_parameters  # noqa: E402
from evil_moe.routing.optim import routed_step  # noqa: E402


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("kind", ["lora", "mlp"])
def test_gradient_checkpointing_gives_the_same_grads(arch, kind):
    model, handle = make(
        arch, kind=kind, n_quarantine=2, router="topk", shared_expert=2, train_base=True
    )
    model.train()
    ids, targets = batch(4, seed=11)
    route = torch.tensor([FORGET, RETAIN, UNLABELED, FORGET])
    calls = []
    layer = next(iter(handle.layers.values()))
    layer.register_forward_pre_hook(lambda *_: calls.append(1))
    plain = grads(model, loss_sum(model, ids, targets, route_labels=route))
    assert len(calls) == 1
    enable = getattr(model, "activation_checkpointing_enable", None)
    (enable or model.gradient_checkpointing_enable)()
    with route_labels(model, route):
        loss = loss_sum(model, ids, targets)
    ckpt = grads(model, loss)  # recomputation in backward, after the block: same plan
    assert len(calls) == 3  # the layer ran again inside backward
    for n in plain:
        assert_close(ckpt[n], plain[n], rtol=1e-10, atol=1e-12, msg=n)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_the_first_routed_call_may_be_under_gradient_checkpointing(arch, reentrant):
    """Recomputation must see the ops of the first forward: nothing in a wrapper decides
    its code path during a forward pass (RoutedNorm checks its module when wrapped)."""
    ids, targets = batch(4, seed=11)
    route = torch.tensor([FORGET, RETAIN, UNLABELED, FORGET])
    kwargs = dict(kind="lora", n_quarantine=2, router="topk", shared_expert=2, train_base=True)
    plain_model, _ = make(arch, **kwargs)
    plain = grads(plain_model, loss_sum(plain_model, ids, targets, route_labels=route))
    model, _ = make(arch, **kwargs)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    ckpt = grads(model, loss_sum(model, ids, targets, route_labels=route))
    for n in plain:
        assert_close(ckpt[n], plain[n], rtol=1e-10, atol=1e-12, msg=n)


def test_gradient_accumulation_equals_one_batch():
    model, _ = make("qwen2", n_quarantine=2, router="topk", shared_expert=2, train_base=True)
    ids, targets = batch(4, seed=13)
    route = torch.tensor([FORGET, RETAIN, UNLABELED, FORGET])
    whole = grads(model, loss_sum(model, ids, targets, route_labels=route))
    model.zero_grad(set_to_none=True)
    for part in (slice(0, 1), slice(1, 4)):
        loss_sum(model, ids[part], targets[part], route_labels=route[part]).backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert_close(p.grad, whole[n], rtol=1e-10, atol=1e-12, msg=n)


def test_ledger_skips_idle_groups_in_adamw():
    model, handle = make("llama", shared_expert=2, train_base=True)
    model.float()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], weight_decay=0.1)
    ledger = handle.ledger()
    groups = ledger.groups
    assert {id(p) for p in groups.quarantine} == {
        id(p) for p in quarantine_parameters(model).values()
    }
    before = {id(p): p.detach().clone() for p in groups.shared}
    ids, targets = batch(2)
    for _ in range(2):  # two accumulated micro-batches, both forget only
        route = torch.tensor([FORGET, FORGET])
        ledger.record(route)
        loss_sum(model, ids, targets, route_labels=route).backward()
    skipped = ledger.release_idle()
    assert skipped == {"shared": True, "quarantine": False}
    opt.step()
    for p in groups.shared:  # neither momentum nor weight decay moved them
        assert torch.equal(p, before[id(p)])
    assert all(p.grad is not None for p in groups.quarantine)


def test_zero_initialised_lora_is_stepped_when_the_labels_allow_it():
    """LoRA ``up`` (A) faces a zero-initialised ``down`` (B): its first gradient is exactly
    zero, yet the step's labels allow it to train, so AdamW steps it (its state exists)."""
    model, handle = make("llama", shared_expert=2, randomize=False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], weight_decay=0.1)
    layer = next(iter(handle.layers.values()))
    ups = [layer.experts.up, layer.shared.up]
    ledger = handle.ledger()
    ids, targets = batch(2)
    route = torch.tensor([FORGET, UNLABELED])
    loss_sum(model, ids, targets, route_labels=route).backward()
    ledger.record(route)
    assert all(p.grad is not None and not p.grad.any() for p in ups)
    report = routed_step(opt, ledger, max_norm=1.0)
    assert report.skipped == []
    assert all(opt.state[p]["step"] == 1 for p in ups)
    # a retain-only step may not train the quarantine: released, state untouched
    loss_sum(model, ids, targets, route_labels=torch.tensor([RETAIN, RETAIN])).backward()
    ledger.record([RETAIN, RETAIN])
    assert routed_step(opt, ledger).skipped == ["quarantine"]
    assert opt.state[layer.experts.up]["step"] == 1 and opt.state[layer.shared.up]["step"] == 2


def test_bf16_autocast_keeps_isolation():
    model, handle = make(
        "llama", n_quarantine=2, router="topk", shared_expert=2, train_base=True, scale=0.05
    )
    model.float()
    ids, targets = batch(2)
    route = torch.tensor([FORGET, RETAIN])
    ref = grads(model, loss_sum(model, ids, targets, route_labels=route))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_sum(model, ids, targets, route_labels=route)
    got = grads(model, loss)
    for n in ref:
        scale = ref[n].abs().max().clamp_min(1e-3)
        assert (got[n] - ref[n]).abs().max() / scale < 0.1, n
    with torch.autocast("cpu", dtype=torch.bfloat16):
        g = grads(model, loss_sum(model, ids, targets, route_labels=torch.tensor([FORGET] * 2)))
    assert all(torch.count_nonzero(g[n]) == 0 for n in shared_names(handle))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        g = grads(model, loss_sum(model, ids, targets, route_labels=torch.tensor([RETAIN] * 2)))
    assert all(torch.count_nonzero(g[n]) == 0 for n in quarantine_parameters(model))


def test_half_precision_base_keeps_float32_adapters():
    model = base_model("llama", dtype=torch.bfloat16)
    handle = inject(model, n_quarantine=2, rank=2, shared_expert=2)
    layer = next(iter(handle.layers.values()))
    assert layer.experts.up.dtype == torch.float32
    ids, targets = batch(2)
    out = model(input_ids=ids, route_labels=torch.tensor([FORGET, UNLABELED]))
    assert out.logits.dtype == torch.bfloat16
    torch.nn.functional.cross_entropy(
        out.logits.float().reshape(-1, VOCAB), targets.reshape(-1)
    ).backward()
    assert layer.experts.down.grad is not None and layer.experts.down.grad.dtype == torch.float32


# ----------------------------------------------------------------------------- collator


def test_collator_sequence_and_token_labels():
    features = [
        {"input_ids": [1, 2, 3], "labels": [1, 2, 3], "route_labels": "forget", "route_modes": 2},
        {"input_ids": [4, 5, 6], "labels": [4, 5, 6], "route_labels": 0, "route_modes": -1},
    ]
    out = RouteLabelCollator()(features)
    assert out["route_labels"].tolist() == [FORGET, RETAIN]
    assert out["route_modes"].tolist() == [2, -1]
    assert out["input_ids"].shape == (2, 3)
    assert "route_labels" in features[0]  # the dataset rows are not mutated

    def pad(feats):
        width = max(len(f["input_ids"]) for f in feats)
        ids = [f["input_ids"] + [0] * (width - len(f["input_ids"])) for f in feats]
        return {"input_ids": torch.tensor(ids)}

    tok = [{"input_ids": [1, 2, 3, 4], "route_labels": [1, 1, 0, 0]},
           {"input_ids": [5, 6], "route_labels": ["retain", "forget"]}]  # fmt: skip
    out = RouteLabelCollator(base=pad)(tok)
    assert out["route_labels"].tolist() == [[1, 1, 0, 0], [0, 1, UNLABELED, UNLABELED]]
    out = RouteLabelCollator(base=pad, padding_side="left")(tok)
    assert out["route_labels"][1].tolist() == [UNLABELED, UNLABELED, 0, 1]
    pad.tokenizer = "tok"  # attributes of the wrapped collator stay visible
    assert RouteLabelCollator(base=pad).tokenizer == "tok"
    with pytest.raises(ValueError, match="mix of per-sequence"):
        RouteLabelCollator(base=pad)([tok[0], {"input_ids": [1], "route_labels": 1}])


# ----------------------------------------------------------------------------- trainer


class _MiniTrainer:
    """The few ``transformers.Trainer`` hooks the mixin overrides, in the Trainer's order.

    Stands in for the real Trainer where ``accelerate`` (which it needs) is missing.
    """

    def __init__(self, model, args, data_collator, train_dataset):
        self.model, self.args, self.data_collator = model, args, data_collator
        self.train_dataset = train_dataset
        self._signature_columns = None
        self.callbacks = []
        self.norms = []

    def add_callback(self, callback):
        self.callbacks.append(callback)

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = list(inspect.signature(self.model.forward).parameters)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return model(**inputs).loss

    def _clip_grad_norm(self, model):
        return torch.nn.utils.clip_grad_norm_(model.parameters(), self.args.max_grad_norm)

    def train(self, optimizer):
        self._set_signature_columns_if_needed()
        keep = set(self._signature_columns)
        rows = [{k: v for k, v in r.items() if k in keep} for r in self.train_dataset]
        accum = self.args.gradient_accumulation_steps
        bs = self.args.per_device_train_batch_size
        self.model.train()
        for start in range(0, len(rows), bs * accum):
            for i in range(accum):
                chunk = rows[start + i * bs : start + (i + 1) * bs]
                loss = self.compute_loss(self.model, self.data_collator(chunk)) / accum
                loss.backward()
            if self.args.max_grad_norm > 0:  # as Trainer: clip, or only measure the norm
                norm = self._clip_grad_norm(self.model)
            else:
                norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), float("inf"))
            self.norms.append(float(norm))
            for cb in self.callbacks:
                cb.on_pre_optimizer_step(self.args, None, None)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


def _dataset(n=8, t=6):
    ids, _ = batch(n, t, seed=21)
    routes = [FORGET, FORGET, FORGET, FORGET, RETAIN, UNLABELED, FORGET, RETAIN]
    return [
        {
            "input_ids": ids[i].tolist(),
            "labels": ids[i].tolist(),
            "route_labels": routes[i % len(routes)],
        }
        for i in range(n)
    ]


def test_trainer_mixin_records_ledger_and_keeps_route_columns():
    from types import SimpleNamespace

    class Mini(RoutedTrainerMixin, _MiniTrainer):
        pass

    model, handle = make("llama", shared_expert=2, train_base=True)
    model.float()
    args = SimpleNamespace(
        max_grad_norm=1.0, gradient_accumulation_steps=2, per_device_train_batch_size=2
    )
    trainer = Mini(model, args, data_collator=None, train_dataset=_dataset())
    assert isinstance(trainer.data_collator, RouteLabelCollator)
    shared = trainer.route_ledger.groups.shared
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], weight_decay=0.1)
    before = {id(p): p.detach().clone() for p in shared}
    trainer.train(opt)
    assert set(ROUTE_KEYS) <= set(trainer._signature_columns)
    assert len(trainer.norms) == 2
    # step 1 (4 forget sequences): shared parameters untouched; step 2 moved them
    # (we can only see the end state: they moved, but not by step 1's weight decay alone)
    assert any(not torch.equal(p, before[id(p)]) for p in shared)
    assert all(r.load.sum() == 0 for r in handle.routers.values())  # router "all"


def test_trainer_mixin_first_step_all_forget_leaves_shared_untouched():
    from types import SimpleNamespace

    class Mini(RoutedTrainerMixin, _MiniTrainer):
        pass

    model, _ = make("gpt2", shared_expert=2, train_base=True)
    model.float()
    args = SimpleNamespace(
        max_grad_norm=1.0, gradient_accumulation_steps=2, per_device_train_batch_size=2
    )
    trainer = Mini(model, args, data_collator=None, train_dataset=_dataset()[:4])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], weight_decay=0.1)
    shared = trainer.route_ledger.groups.shared
    quarantine = trainer.route_ledger.groups.quarantine
    before = {id(p): p.detach().clone() for p in shared + quarantine}
    trainer.train(opt)
    assert all(torch.equal(p, before[id(p)]) for p in shared)
    assert any(not torch.equal(p, before[id(p)]) for p in quarantine)


def test_hf_trainer_runs_with_route_labels(tmp_path):
    pytest.importorskip("accelerate")
    from evil_moe.models.hf import RoutedTrainer

    model, handle = make("llama", n_quarantine=2, router="topk", shared_expert=2, train_base=True)
    model.float()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = RoutedTrainer(model=model, args=args, train_dataset=_dataset(12))
    # per-group clipping replaces the Trainer's global clip, in the trainer's copy of args
    assert trainer.args.max_grad_norm == 0 and args.max_grad_norm == 1.0
    callback = next(c for c in trainer.callback_handler.callbacks if hasattr(c, "ledger"))
    assert callback.max_norm == 1.0 and callback.ledger is trainer.route_ledger
    trainer.train()
    assert callback.report is not None and set(callback.report.grad_norm) == {
        "shared",
        "quarantine",
    }
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert sum(float(r.load.sum()) for r in handle.routers.values()) > 0
