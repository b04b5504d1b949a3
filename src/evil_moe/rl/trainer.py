"""``RoutedGRPOTrainer``: TRL's GRPO with route labels per completion.

After generation and scoring, a **monitor** ``(prompts, completions, step=..., **columns)
-> flags`` labels each completion (``True`` / ``"forget"`` = flagged). What a flag does
depends on the method:

* ``none``: nothing (labels are only logged);
* ``penalty``: the flagged completion's reward is set to 0 (what practitioners do today);
* ``filter``: the flagged completion is dropped from the loss (its token mask is zeroed);
* ``sgtm`` / ``gradient_routing``: the flagged completion's policy-gradient (and KL)
  terms train only the quarantine, exactly per token: every position of a flagged row
  (its prompt too, so no gradient reaches shared weights through attention to the prompt)
  carries the ``forget`` route label in the loss forward. The forward values are those of
  the unrouted model, so the importance ratios stay exact.

**Baseline.** ``baseline="unflagged"`` computes the advantage of an unflagged completion
against the unflagged completions of its group only; flagged completions are compared
with the whole group. ``"all"`` is TRL's group baseline for everyone. ``"auto"`` is
``"all"`` for ``none`` / ``penalty`` and ``"unflagged"`` otherwise (with a flagged hack
in the baseline, pushing the honest completions of its group down moves probability onto
the hack through the shared weights; see ``docs/rl.md``).

**Reference model for KL** (``beta > 0``): a frozen copy of the policy at the start of
GRPO with its quarantine removed (the deployed warm start).

**The optimizer step** of every update is :func:`routed_optimizer_step`, the library's
routed step (ledger, per-group clipping, step) in one place.
``train()`` runs :meth:`RoutedGRPOTrainer.grpo_step` for ``args.max_steps`` batches of the
train dataset; it supports ``num_iterations = steps_per_generation =
gradient_accumulation_steps = 1`` and text prompts.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from accelerate.utils import gather
from torch import Tensor, nn
from trl import GRPOTrainer

from evil_moe.models.hf import QuarantineHandle, get_handle
from evil_moe.routing.labels import RouteLabel
from evil_moe.routing.optim import StepLedger, routed_step

METHODS = ("none", "penalty", "filter", "sgtm", "gradient_routing")
#: methods whose flagged completions train only the quarantine (value: routing semantics)
ROUTING = {"sgtm": "sgtm", "gradient_routing": "gradient_routing"}
BASELINES = ("auto", "all", "unflagged")
_FLAG_NAMES = {"forget": True, "unlabeled": False}


def resolve_baseline(method: str, baseline: str) -> str:
    """``auto`` -> ``all`` for ``none`` / ``penalty``, ``unflagged`` for the others."""
    if baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}; choose from {BASELINES}")
    if baseline != "auto":
        return baseline
    return "all" if method in ("none", "penalty") else "unflagged"


def group_advantages(
    rewards: Tensor,
    flagged: Tensor,
    num_generations: int,
    baseline: str = "all",
    scale: bool = True,
    eps: float = 1e-4,
) -> Tensor:
    """GRPO advantages of consecutive groups of ``num_generations`` completions.

    ``baseline="all"`` reproduces TRL (group mean, Bessel-corrected group std, a group
    of one gets 0). ``"unflagged"``: unflagged completions use the mean / std of the
    unflagged completions of their group; flagged ones those of the whole group.
    """
    r = rewards.reshape(-1, num_generations).double()
    f = flagged.reshape(-1, num_generations).bool()

    def stats(mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        w = mask.double()
        count = w.sum(1, keepdim=True)
        mean = (r * w).sum(1, keepdim=True) / count.clamp_min(1)
        var = ((r - mean) ** 2 * w).sum(1, keepdim=True) / (count - 1).clamp_min(1)
        return mean, var.sqrt(), count

    mean, std, count = stats(torch.ones_like(f))
    if baseline == "unflagged":
        u_mean, u_std, u_count = stats(~f)
        mean = torch.where(f, mean, u_mean)
        std = torch.where(f, std, u_std)
        count = torch.where(f, count, u_count)
    elif baseline != "all":
        raise ValueError(f"baseline must be 'all' or 'unflagged', got {baseline!r}")
    adv = r - mean
    if scale:
        adv = torch.where(count > 1, adv / (std + eps), torch.zeros_like(adv))
    return adv.reshape(-1).to(rewards.dtype)


def routed_optimizer_step(
    ledger: StepLedger, optimizer: torch.optim.Optimizer, max_grad_norm: float
) -> dict[str, Any]:
    """The optimizer step of every RL update: the library's routed step.

    :func:`evil_moe.routing.optim.routed_step` releases the gradients of groups that no
    completion of the step may train (so AdamW moves them by neither momentum nor weight
    decay on behalf of flagged completions), clips shared and quarantine gradients
    separately (``max_grad_norm <= 0``: measured, not clipped) and steps. Gradients are
    left for the caller to clear.
    """
    clip = max_grad_norm if max_grad_norm > 0 else math.inf
    report = routed_step(optimizer, ledger, clip, zero_grad=False)
    return {"grad_norm": report.grad_norm, "skipped": report.skipped}


def as_flags(labels: Sequence[Any]) -> list[bool]:
    """A monitor's output as booleans (``True`` / 1 / ``"forget"`` = flagged)."""
    out = []
    for v in labels:
        if isinstance(v, str):
            if v not in _FLAG_NAMES:
                raise ValueError(f"monitor label {v!r}: use 'forget' or 'unlabeled' (or booleans)")
            out.append(_FLAG_NAMES[v])
        elif isinstance(v, bool):
            out.append(v)
        elif int(v) in (int(RouteLabel.FORGET), int(RouteLabel.UNLABELED)):
            out.append(int(v) == int(RouteLabel.FORGET))
        else:
            raise ValueError(f"monitor label {v!r}: RL completions are forget or unlabeled")
    return out


def independent_copy(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` of a policy that no longer runs the original's forward.

    TRL patches ``model.forward`` with a closure over the *original* bound forward; a
    deep copy keeps that closure, so the copy would compute with the original's weights.
    The instance-level patch is dropped from the copy (the class forward is restored).
    """
    clone = copy.deepcopy(model)
    clone.__dict__.pop("forward", None)
    return clone


def deployed_copy(model: nn.Module) -> nn.Module:
    """A frozen copy of ``model`` with its quarantine removed (the KL reference)."""
    ref = independent_copy(model)
    get_handle(ref).ablate()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref.eval()


class RoutedGRPOTrainer(GRPOTrainer):
    """TRL's ``GRPOTrainer`` with a monitor, route labels per completion and routed steps.

    ``model`` must carry a quarantine (:func:`evil_moe.models.hf.inject`); for ``sgtm`` /
    ``gradient_routing`` it must have been injected with that semantics. Extra arguments:
    ``monitor`` (required unless ``method="none"``), ``method``, ``baseline``,
    ``quarantine_lr_multiplier`` (the quarantine's learning rate over the shared one).
    """

    def __init__(
        self,
        model: nn.Module,
        reward_funcs: Any,
        args: Any,
        *,
        monitor: Callable[..., Sequence[Any]] | None = None,
        method: str = "sgtm",
        baseline: str = "auto",
        quarantine: QuarantineHandle | None = None,
        quarantine_lr_multiplier: float = 1.0,
        **kwargs: Any,
    ):
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
        if monitor is None and method != "none":
            raise ValueError(f"method {method!r} needs a monitor")
        if quarantine_lr_multiplier <= 0:
            raise ValueError("quarantine_lr_multiplier must be > 0")
        unsupported = {
            "num_iterations": args.num_iterations,
            "steps_per_generation": args.steps_per_generation,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
        }
        bad = [k for k, v in unsupported.items() if v != 1]
        if bad:
            raise ValueError(f"RoutedGRPOTrainer supports {', '.join(bad)} = 1 only")
        if args.scale_rewards not in ("group", "none"):
            raise ValueError("RoutedGRPOTrainer supports scale_rewards 'group' or 'none'")
        if args.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError(
                "RoutedGRPOTrainer supports multi_objective_aggregation='sum_then_normalize'"
            )
        handle = quarantine if quarantine is not None else get_handle(model)
        if method in ROUTING and handle.config.semantics != ROUTING[method]:
            raise ValueError(
                f"method {method!r} needs the quarantine injected with semantics={ROUTING[method]!r}, "
                f"got {handle.config.semantics!r}"
            )
        beta = args.beta
        args.beta = 0.0  # TRL would load a reference from the hub; ours is built below
        try:
            super().__init__(model=model, reward_funcs=reward_funcs, args=args, **kwargs)
        finally:
            args.beta = beta
        self.beta = beta
        self.ref_model = deployed_copy(self.model) if beta != 0.0 else None
        self.quarantine = handle
        self.monitor = monitor
        self.method = method
        self.baseline = resolve_baseline(method, baseline)
        self.quarantine_lr_multiplier = quarantine_lr_multiplier
        self.route_ledger = handle.ledger()
        self.current_gradient_accumulation_steps = 1
        self._loss_route: Tensor | None = None
        self._scored: dict[str, Tensor] = {}
        self.last_batch: dict[str, Any] = {}

    # -- optimizer -------------------------------------------------------------------
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """AdamW over shared (decayed matrices, undecayed vectors) and quarantine groups."""
        if self.optimizer is not None:
            return self.optimizer
        groups = self.route_ledger.groups
        quarantine = {id(p) for p in groups.quarantine}
        shared = [p for p in groups.shared if p.requires_grad and id(p) not in quarantine]
        a = self.args
        lr = a.learning_rate
        param_groups = [
            {
                "params": [p for p in shared if p.dim() >= 2],
                "weight_decay": a.weight_decay,
                "lr": lr,
            },
            {"params": [p for p in shared if p.dim() < 2], "weight_decay": 0.0, "lr": lr},
            {
                "params": [p for p in groups.quarantine if p.requires_grad],
                "weight_decay": 0.0,
                "lr": lr * self.quarantine_lr_multiplier,
            },
        ]
        for g in param_groups:
            g["base_lr"] = g["lr"]
        self.optimizer = torch.optim.AdamW(
            [g for g in param_groups if g["params"]],
            lr=lr,
            betas=(a.adam_beta1, a.adam_beta2),
            eps=a.adam_epsilon,
        )
        return self.optimizer

    def _set_lr(self, step: int) -> None:
        warm = self.args.warmup_steps
        factor = min(1.0, (step + 1) / warm) if warm else 1.0
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * factor

    # -- scoring ---------------------------------------------------------------------
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        columns = {
            k: [x[k] for x in inputs] for k in inputs[0] if k not in ("prompt", "completion")
        }
        if self.monitor is None:
            local = [False] * len(prompts)
        else:
            local = as_flags(
                self.monitor(
                    prompts=prompts, completions=completions, step=self.state.global_step, **columns
                )
            )
            if len(local) != len(prompts):
                raise ValueError(
                    f"the monitor returned {len(local)} labels for {len(prompts)} completions"
                )
        flagged_local = torch.tensor(local, dtype=torch.bool, device=rewards.device)
        flagged = gather(flagged_local.to(torch.long)).bool()
        if self.method == "penalty":
            rewards = rewards.clone()
            rewards[flagged] = 0.0
        self._scored = {"rewards": rewards, "flagged": flagged, "flagged_local": flagged_local}
        return rewards

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        g = self.num_generations if mode == "train" else self.num_generations_eval
        scored = self._scored
        weights = self.reward_weights.to(scored["rewards"].device)
        rewards = (scored["rewards"] * weights.unsqueeze(0)).nansum(dim=1)
        adv = group_advantages(
            rewards, scored["flagged"], g, self.baseline, self.args.scale_rewards != "none"
        )
        n = len(inputs)
        rank = self.accelerator.process_index
        out["advantages"] = adv[rank * n : (rank + 1) * n].to(out["advantages"].dtype)
        flagged = scored["flagged_local"]
        out["route_labels"] = torch.where(
            flagged, int(RouteLabel.FORGET), int(RouteLabel.UNLABELED)
        ).to(out["completion_ids"].device)
        if self.method == "filter" and bool(flagged.any()):
            keep = (~flagged).to(out["completion_mask"].dtype)[:, None]
            tool = out.get("tool_mask")
            out["tool_mask"] = keep.expand_as(out["completion_mask"]) * (
                1 if tool is None else tool
            )
        self.last_batch = {
            "flagged": flagged.cpu(),
            "rewards": rewards.cpu(),
            "advantages": adv.cpu(),
        }
        return out

    # -- loss ------------------------------------------------------------------------
    def _compute_loss(self, model, inputs):
        route = inputs.get("route_labels") if self.method in ROUTING else None
        if model.training:
            self.route_ledger.record(route)
        self._loss_route = route
        try:
            return super()._compute_loss(model, inputs)
        finally:
            self._loss_route = None

    def _get_per_token_logps_and_entropies(
        self,
        model,
        input_ids,
        attention_mask,
        logits_to_keep,
        batch_size=None,
        compute_entropy=False,
        compute_aux_loss=False,
        **multimodal,
    ):
        """Log-probabilities through the model's own LM head (a routed wrapper when the
        base trains), with the current route labels sliced per chunk. Text only."""
        if compute_aux_loss or any(v is not None for v in multimodal.values()):
            raise NotImplementedError("RoutedGRPOTrainer supports text-only, non-MoE-aux models")
        route = self._loss_route
        size = batch_size or input_ids.size(0)
        logps, entropies = [], []
        for start in range(0, input_ids.size(0), size):
            ids = input_ids[start : start + size]
            kwargs = {"input_ids": ids, "attention_mask": attention_mask[start : start + size]}
            if route is not None:
                kwargs["route_labels"] = route[start : start + size]
            with self.accelerator.autocast():
                logits = model(**kwargs, use_cache=False).logits
            logits = logits[:, -logits_to_keep - 1 : -1]
            if logits.dtype in (torch.float16, torch.bfloat16):
                logits = logits.float()
            logits = logits / self.temperature
            logp = logits.log_softmax(dim=-1)
            logps.append(logp.gather(-1, ids[:, -logits_to_keep:, None]).squeeze(-1))
            if compute_entropy:
                with torch.set_grad_enabled(
                    torch.is_grad_enabled() and self._entropy_bonus_enabled
                ):
                    entropies.append(-(logp.exp() * logp).sum(-1))
        ent = torch.cat(entropies) if compute_entropy else None
        return torch.cat(logps), ent, None

    # -- training --------------------------------------------------------------------
    def grpo_step(self, generation_batch: list[dict[str, Any]]) -> dict[str, Any]:
        """One GRPO update on one generation batch (``prompts x num_generations`` rows);
        returns TRL's metrics of the step plus group gradient norms and flagged share."""
        if self.optimizer is None:
            self.create_optimizer()
        self._set_lr(self.state.global_step)
        self.model.train()
        inputs = self._prepare_inputs(generation_batch)
        loss = self.compute_loss(self.model, inputs)
        loss.backward()
        report = routed_optimizer_step(self.route_ledger, self.optimizer, self.args.max_grad_norm)
        self.optimizer.zero_grad(set_to_none=True)
        self._step += 1
        self.state.global_step += 1
        metrics = {k: sum(v) / len(v) for k, v in self._metrics["train"].items() if v}
        self._metrics["train"].clear()
        metrics.update(report)
        metrics["loss"] = float(loss.detach())
        metrics["flagged_share"] = float(self.last_batch["flagged"].float().mean())
        return metrics

    def train(self, resume_from_checkpoint: Any = None, **kwargs: Any) -> list[dict[str, Any]]:
        """Run :meth:`grpo_step` on ``args.max_steps`` batches of the train dataset.

        No HF checkpoints: :func:`evil_moe.rl.run.run_rl` is the resumable recipe.
        """
        if resume_from_checkpoint:
            raise ValueError("RoutedGRPOTrainer.train does not resume; use evil_moe.rl.run.run_rl")
        if self.args.max_steps <= 0:
            raise ValueError("set args.max_steps > 0")
        loader = self.get_train_dataloader()
        batches = iter(loader)
        history = []
        for _ in range(self.args.max_steps):
            try:
                batch = next(batches)
            except StopIteration:
                batches = iter(loader)
                batch = next(batches)
            history.append(self.grpo_step(batch))
        return history
