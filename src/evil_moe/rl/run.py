"""The ``evil-moe rl`` recipe: warm start, routed GRPO, held-out evaluation, relearning.

    metrics = run_rl(load_rl_config(None, ["grpo.method=penalty"]), "runs/rl-penalty")

Outputs in the run directory (the conventions of ``evil-moe train``, written atomically
with :mod:`evil_moe.train.io`): ``config.json``, ``train_log.jsonl``, ``metrics.json``,
``model.safetensors`` (the trained policy, quarantine included), ``quarantine/`` (the
adapters alone: ``quarantine_model.safetensors`` + ``quarantine_config.json``, loadable
with :func:`evil_moe.models.hf.load_quarantine`) and ``tokenizer.json``. A checkpoint
(``checkpoint.json`` + safetensors) is written every ``grpo.checkpoint_every`` steps and
after the last one; running the same command again resumes from it. Every step's
sampling is seeded by ``(seed, step)`` and the monitor by its step, so a resumed run
computes what an uninterrupted one would have.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from evil_moe.io import (
    append_jsonl,
    read_jsonl,
    read_tensors,
    write_json,
    write_jsonl,
    write_tensors,
)
from evil_moe.rl.config import RLConfig
from evil_moe.rl.evaluate import (
    evaluate_policy,
    evaluate_view,
    gradient_norms_by_group,
    heldout_tasks,
)
from evil_moe.rl.monitor import SimulatedMonitor, TaskReward, summarize
from evil_moe.rl.policy import make_policy, make_tokenizer
from evil_moe.rl.task import MODES, Task, make_task
from evil_moe.rl.trainer import (
    ROUTING,
    RoutedGRPOTrainer,
    independent_copy,
    routed_optimizer_step,
)
from evil_moe.rl.warmstart import warm_start
from evil_moe.train.devices import autocast_dtype, resolve_device
from evil_moe.train.io import load_checkpoint, save_checkpoint

WARM_FILE = "warmstart.safetensors"


def make_monitor(cfg: RLConfig) -> SimulatedMonitor:
    m = cfg.monitor
    return SimulatedMonitor(
        recall=m.recall,
        recall_by_mode=dict(m.recall_by_mode),
        never_flagged=tuple(m.never_flagged),
        false_positive_rate=m.false_positive_rate,
        seed=cfg.seed,
    )


def flagged_modes(cfg: RLConfig) -> list[str]:
    """Hack modes the monitor can flag (recall > 0)."""
    monitor = make_monitor(cfg)
    return [m for m in MODES if monitor.recall_for(m) > 0]


def _routed_warm_start(cfg: RLConfig) -> bool:
    return cfg.warmstart.route and cfg.grpo.method in ROUTING


def inject_quarantine(model: torch.nn.Module, cfg: RLConfig):
    """The configured quarantine on every linear layer (``lora``) or MLP (``mlp``), with
    the base trained and routed; seeded by ``cfg.seed``."""
    from evil_moe.models.hf import inject
    from evil_moe.routing.routers import RouterConfig

    q = cfg.quarantine
    router = (
        RouterConfig(amplify=True, amplify_threshold=q.amplify_threshold) if q.amplify else None
    )
    semantics = ROUTING.get(cfg.grpo.method, "sgtm")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return inject(
            model,
            n_quarantine=q.n_experts,
            kind=q.kind,
            rank=q.rank * q.n_experts if q.kind == "mlp" else q.rank,
            router=router,
            semantics=semantics,
            train_base=True,
            init_std=q.init_std or None,
        )


def task_factory(cfg: RLConfig) -> Callable[[random.Random], Task]:
    """``new_task(rng)`` for the configured task family."""
    t = cfg.task

    def new_task(rng: random.Random) -> Task:
        return make_task(rng, tuple(t.ops), t.hard_share, tuple(t.harnesses), t.hidden_tests)

    return new_task


def warmstart_key(cfg: RLConfig) -> str:
    """Fingerprint of everything the warm start depends on."""
    values = cfg.to_dict()
    task = {k: v for k, v in values["task"].items() if k != "token_cost"}  # reward only
    parts: dict[str, Any] = {
        "seed": cfg.seed,
        "task": task,
        "policy": values["policy"],
        "warmstart": values["warmstart"],
    }
    if _routed_warm_start(cfg):
        parts.update(
            monitor=values["monitor"], quarantine=values["quarantine"], method=cfg.grpo.method
        )
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def build_warm_policy(
    cfg: RLConfig, out: Path | None, progress: bool
) -> tuple[Any, Any, dict[str, Any]]:
    """``(model, handle, warm-start record)``: the warm-started policy with its quarantine,
    loaded from the cache (or ``out/warmstart``) or trained and stored there."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tok = make_tokenizer()
    model = make_policy(cfg.policy, tok, seed=cfg.seed).to(resolve_device(cfg.device))
    routed = _routed_warm_start(cfg)
    if cfg.warmstart_cache:
        where: Path | None = Path(cfg.warmstart_cache) / warmstart_key(cfg)
    else:
        where = out / "warmstart" if out is not None else None
    handle = inject_quarantine(model, cfg) if routed else None
    if where is not None and (where / WARM_FILE).exists():
        model.load_state_dict(read_tensors(where / WARM_FILE))
        record = json.loads((where / "warmstart.json").read_text(encoding="utf-8"))
    else:
        began = time.perf_counter()
        flag, step_fn = None, None
        if routed:
            monitor = make_monitor(cfg)
            ledger = handle.ledger()

            def flag(kinds: list[str], step: int) -> list[bool]:
                return monitor.flags([k if k in MODES else None for k in kinds], step)

            def step_fn(opt: torch.optim.Optimizer, route: torch.Tensor | None) -> None:
                ledger.record(route)
                routed_optimizer_step(ledger, opt, 1.0)

        losses = warm_start(
            model,
            tok,
            cfg.warmstart,
            cfg.seed,
            task_factory(cfg),
            flag,
            step_fn,
            progress,
            cfg.task.ops,
        )
        tasks = _heldout(cfg)
        summary, _, _ = evaluate_view(
            model, tok, tasks, cfg.grpo.max_completion_length, cfg.grpo.temperature, cfg.seed
        )
        record = {
            "key": warmstart_key(cfg),
            "routed": routed,
            "seconds": time.perf_counter() - began,
            "final_loss": sum(losses[-20:]) / len(losses[-20:]),
            "heldout": summary,
        }
        if where is not None:
            write_tensors(where / WARM_FILE, model.state_dict())
            write_json(where / "warmstart.json", record)
    if handle is None:
        handle = inject_quarantine(model, cfg)
    return model, handle, record


def _heldout(cfg: RLConfig, n: int | None = None) -> list:
    t = cfg.task
    return heldout_tasks(
        n or cfg.eval.prompts, cfg.seed, t.ops, t.hard_share, t.harnesses, t.hidden_tests
    )


def make_trainer(
    model: Any, handle: Any, cfg: RLConfig, method: str, tmp: str
) -> tuple[RoutedGRPOTrainer, TaskReward]:
    """A :class:`RoutedGRPOTrainer` for ``method`` with the run's GRPO settings."""
    import transformers
    from datasets import Dataset
    from trl import GRPOConfig

    transformers.logging.set_verbosity_error()
    g = cfg.grpo
    # transformers 5 renames gradient checkpointing; the note is noise for this recipe
    warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.*", category=FutureWarning)
    device = next(model.parameters()).device
    args = GRPOConfig(
        output_dir=tmp,
        use_cpu=device.type == "cpu",
        bf16=autocast_dtype(device) is not None,
        gradient_checkpointing=False,
        learning_rate=g.lr,
        weight_decay=g.weight_decay,
        per_device_train_batch_size=g.prompts_per_step * g.generations,
        num_generations=g.generations,
        max_completion_length=g.max_completion_length,
        temperature=g.temperature,
        beta=g.beta,
        loss_type=g.loss_type,
        max_grad_norm=g.grad_clip,
        report_to=[],
        save_strategy="no",
        logging_steps=10**9,
        disable_dropout=True,
        seed=cfg.seed,
    )
    reward = TaskReward(cfg.task.token_cost)
    example = make_task(
        random.Random(0), tuple(cfg.task.ops), cfg.task.hard_share, tuple(cfg.task.harnesses)
    )
    dataset = Dataset.from_list([{"prompt": example.prompt, "task": example.to_dict()}])
    trainer = RoutedGRPOTrainer(
        model,
        [reward],
        args,
        train_dataset=dataset,
        processing_class=make_tokenizer(),
        monitor=make_monitor(cfg) if method != "none" else None,
        method=method,
        baseline=cfg.grpo.baseline if method == cfg.grpo.method else "auto",
        quarantine=handle,
        quarantine_lr_multiplier=cfg.quarantine.lr_multiplier,
    )
    trainer.create_optimizer()
    return trainer, reward


def step_batch(cfg: RLConfig, step: int) -> list[dict[str, Any]]:
    """The generation batch of ``step``: ``prompts_per_step`` fresh tasks, each repeated
    ``generations`` times (seeded by ``(seed, step)``)."""
    rng = random.Random(f"train-{cfg.seed}-{step}")
    new_task = task_factory(cfg)
    tasks = [new_task(rng) for _ in range(cfg.grpo.prompts_per_step)]
    return [
        {"prompt": x.prompt, "task": x.to_dict()}
        for x in tasks
        for _ in range(cfg.grpo.generations)
    ]


def _seed_step(cfg: RLConfig, step: int) -> None:
    torch.manual_seed(int(hashlib.sha256(f"{cfg.seed}-{step}".encode()).hexdigest()[:12], 16))


def train_grpo(
    trainer: RoutedGRPOTrainer,
    reward: TaskReward,
    cfg: RLConfig,
    out: Path | None,
    progress: bool,
    on_checkpoint: Callable[[int], None] | None = None,
) -> tuple[list[dict[str, Any]], float]:
    """The GRPO loop, resumable from ``out``; returns the log and training seconds."""
    g = cfg.grpo
    model, optimizer = trainer.model, trainer.optimizer
    start, log = 0, []
    if out is not None:
        resumed = load_checkpoint(out, model, optimizer)
        if resumed is not None:
            start = resumed
            log = [r for r in read_jsonl(out / "train_log.jsonl") if r["step"] <= start]
        write_jsonl(out / "train_log.jsonl", log)
    trainer.state.global_step = trainer._step = start
    seconds = float(log[-1]["train_seconds"]) if log else 0.0
    window: list[dict[str, Any]] = []
    bar = tqdm(
        total=g.steps, initial=start, desc=f"grpo {g.method}", disable=not progress, leave=False
    )
    for step in range(start, g.steps):
        began = time.perf_counter()
        _seed_step(cfg, step)
        metrics = trainer.grpo_step(step_batch(cfg, step))
        seconds += time.perf_counter() - began
        s = summarize(reward.last)
        window.append({**s, "flagged": metrics["flagged_share"], "grad_norm": metrics["grad_norm"]})
        bar.update(1)
        if (step + 1) % g.log_every == 0 or step + 1 == g.steps:
            record = _window_record(step + 1, window, seconds)
            window = []
            log.append(record)
            bar.set_postfix(hack=f"{record['hack']:.2f}", solve=f"{record['solve']:.2f}")
            if out is not None:
                append_jsonl(out / "train_log.jsonl", record)
        last = step + 1 == g.steps
        if out is not None and (
            (g.checkpoint_every and (step + 1) % g.checkpoint_every == 0) or last
        ):
            save_checkpoint(out, step + 1, model, optimizer)
            if on_checkpoint is not None:
                on_checkpoint(step + 1)
    bar.close()
    return log, seconds


def _window_record(step: int, window: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    n = len(window)

    def mean(key: str) -> float:
        return sum(w[key] for w in window) / n

    groups = window[0]["grad_norm"].keys()
    return {
        "step": step,
        "reward": mean("reward"),
        "solve": mean("solve"),
        "hack": mean("hack"),
        "hack_by_mode": {m: sum(w["hack_by_mode"][m] for w in window) / n for m in MODES},
        "flagged": mean("flagged"),
        "grading_errors": sum(w["grading_errors"] for w in window),
        "grad_norm": {k: sum(w["grad_norm"][k] for w in window) / n for k in groups},
        "train_seconds": seconds,
    }


def relearning(model: Any, cfg: RLConfig, target: float, tmp: str) -> dict[str, Any]:
    """GRPO without intervention on an ablated copy until the held-out hack rate reaches
    ``target`` (the as-trained rate on the same tasks) or ``eval.relearn_steps`` pass."""
    from evil_moe.models.hf import get_handle

    e, g = cfg.eval, cfg.grpo
    clone = independent_copy(model)
    handle = get_handle(clone)
    handle.ablate()  # zeroed and frozen: only the deployed weights can relearn
    trainer, _ = make_trainer(clone, handle, cfg, "none", tmp)
    tasks = _heldout(cfg, e.relearn_prompts)
    tok = make_tokenizer()

    def hack_rate() -> float:
        s, _, _ = evaluate_view(
            clone, tok, tasks, g.max_completion_length, g.temperature, cfg.seed + 1
        )
        return s["hack"]

    curve = [[0, hack_rate()]]
    reached = 0 if curve[0][1] >= target else None
    step = 0
    while reached is None and step < e.relearn_steps:
        _seed_step(cfg, 10**6 + step)
        trainer.grpo_step(step_batch(cfg, 10**6 + step))
        step += 1
        if step % e.relearn_eval_every == 0 or step == e.relearn_steps:
            curve.append([step, hack_rate()])
            if curve[-1][1] >= target:
                reached = step
    return {"target": target, "steps": reached, "cap": e.relearn_steps, "curve": curve}


def relearning_of(model: Any, cfg: RLConfig, tmp: str) -> dict[str, Any]:
    """:func:`relearning` to the as-trained hack rate of ``model`` on the relearning tasks."""
    g = cfg.grpo
    tasks = _heldout(cfg, cfg.eval.relearn_prompts)
    target, _, _ = evaluate_view(
        model, make_tokenizer(), tasks, g.max_completion_length, g.temperature, cfg.seed + 1
    )
    return relearning(model, cfg, target["hack"], tmp)


def relearning_of_run(run_dir: str | Path) -> dict[str, Any]:
    """Relearning of a finished run, from its ``config.json`` and ``model.safetensors``."""
    from evil_moe.rl.config import rl_config_from_dict

    run_dir = Path(run_dir)
    cfg = rl_config_from_dict(json.loads((run_dir / "config.json").read_text(encoding="utf-8")))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model = make_policy(cfg.policy, make_tokenizer(), seed=cfg.seed).to(resolve_device(cfg.device))
    inject_quarantine(model, cfg)
    model.load_state_dict(read_tensors(run_dir / "model.safetensors"))
    with tempfile.TemporaryDirectory() as tmp:
        return relearning_of(model, cfg, tmp)


def _save_adapters(handle: Any, out: Path) -> None:
    """``handle.save`` into a temporary directory, then each file renamed into place."""
    final = out / "quarantine"
    final.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        handle.save(tmp)
        for name in sorted(os.listdir(tmp), key=lambda n: n.endswith(".json")):  # weights first
            os.replace(Path(tmp) / name, final / name)


def run_rl(
    cfg: RLConfig,
    out_dir: str | Path | None = None,
    progress: bool = True,
    on_checkpoint: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Run everything and return the metrics (also written to ``out_dir/metrics.json``)."""
    began = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", cfg.to_dict())
    model, handle, warm = build_warm_policy(cfg, out, progress)
    tok = make_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        trainer, reward = make_trainer(model, handle, cfg, cfg.grpo.method, tmp)
        log, seconds = train_grpo(trainer, reward, cfg, out, progress, on_checkpoint)
        routers = {  # token counts of the backward routers during training (amplifier)
            "amplified_tokens": sum(float(r.amplified_tokens) for r in handle.routers.values()),
            "routed_tokens": sum(float(r.routed_tokens) for r in handle.routers.values()),
        }
        g, e = cfg.grpo, cfg.eval
        tasks = _heldout(cfg)
        result = evaluate_policy(
            handle, tok, tasks, g.max_completion_length, g.temperature, cfg.seed, e.scales
        )
        completions, verdicts = result.pop("_samples")
        norms = None
        if e.grad_norm_samples:
            norms = gradient_norms_by_group(
                handle, tok, tasks, completions, verdicts, flagged_modes(cfg), e.grad_norm_samples
            )
        relearn = relearning_of(model, cfg, tmp) if e.relearn_steps else None
    metrics: dict[str, Any] = {
        "method": cfg.grpo.method,
        "baseline": trainer.baseline,
        "seed": cfg.seed,
        "flagged_modes": flagged_modes(cfg),
        "warm_start": warm,
        **result,
        "relearning": relearn,
        "gradient_norms_by_group": norms,
        "train": {
            "steps": cfg.grpo.steps,
            "seconds": seconds,
            "seconds_per_step": seconds / max(1, cfg.grpo.steps),
            "last_log": log[-1] if log else None,
            "grading_errors": sum(r["grading_errors"] for r in log),
        },
        "parameters": handle.num_parameters(),
        "routers": routers,
        "wall_seconds": time.perf_counter() - began,
    }
    if out is not None:
        write_tensors(out / "model.safetensors", model.state_dict(), {"method": cfg.grpo.method})
        _save_adapters(handle, out)
        tok.backend_tokenizer.save(str(out / "tokenizer.json.tmp"))
        os.replace(out / "tokenizer.json.tmp", out / "tokenizer.json")
        write_json(out / "metrics.json", metrics)
        for stale in (*out.glob("checkpoint-*.safetensors"), out / "checkpoint.json"):
            stale.unlink(missing_ok=True)
    return metrics
