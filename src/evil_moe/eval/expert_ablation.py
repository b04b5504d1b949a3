"""What each quarantine expert does, measured on held-out data, one (layer, expert) at a time.

* **Cancellation ratio** of a bank: ``sum_k |y_k| / |sum_k y_k|`` per token (mean over
  tokens), with ``y_k`` expert ``k``'s output. About 1 when experts add up, much larger
  when they grow against each other and their sum stays small.
* **Mean-ablation matrix**: each (layer, expert) unit in turn is replaced by its mean
  output over the reference tokens (every row's tokens together), not by zero: zeroing one
  expert of a bank whose experts cancel measures the cancellation, not what the expert
  knows. The per-sequence loss increase gives a ``rows x units`` matrix (rows: retain and
  each forget mode); its normalised mutual information over the forget rows says whether
  units specialise by mode, and a permutation null (forget sequences' mode labels
  shuffled) says whether that NMI is more than chance.
* **Distinctive-token losses**: per forget mode, the loss on the positions whose target
  token is much more frequent in that mode than in retain data (the tokens that make the
  mode what it is), as trained and ablated.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from evil_moe.models.testbed import lm_loss
from evil_moe.modules.ablation import ablated
from evil_moe.modules.experts import FusedExperts

#: a target token is distinctive for a mode when its frequency there is this many times
#: its (add-one smoothed) frequency in retain data
DISTINCTIVE_RATIO = 8.0


def expert_banks(model: nn.Module) -> list[tuple[str, FusedExperts]]:
    """Every quarantine expert bank of ``model`` with its name, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FusedExperts)]


def per_expert_outputs(bank: FusedExperts, x: Tensor, gate: Tensor | None = None) -> Tensor:
    """``[N, K, d_out]``: each expert's output for the ``N`` flattened tokens of ``x``."""
    flat = x.reshape(-1, x.shape[-1])
    h = bank.act(torch.nn.functional.linear(flat, bank.up, bank.up_bias))
    h = h.view(flat.shape[0], bank.n_experts, bank.expert_width)
    if gate is not None:
        h = h * gate.reshape(-1, bank.n_experts, 1).to(h.dtype)
    down = bank.down.view(bank.down.shape[0], bank.n_experts, bank.expert_width)
    return torch.einsum("nkw,dkw->nkd", h, down)


@contextmanager
def _capture_inputs(model: nn.Module) -> Iterator[dict[str, list[tuple[Tensor, Tensor | None]]]]:
    captured: dict[str, list[tuple[Tensor, Tensor | None]]] = {}
    hooks = []
    for name, bank in expert_banks(model):
        captured[name] = []

        def hook(_m: nn.Module, args: tuple, kwargs: dict, _out: Tensor, name: str = name) -> None:
            captured[name].append((args[0].detach(), kwargs.get("gate")))

        hooks.append(bank.register_forward_hook(hook, with_kwargs=True))
    try:
        yield captured
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def cancellation_ratio(model: nn.Module, tokens: Tensor, batch_size: int = 32) -> dict[str, Any]:
    """Per bank and overall: mean over tokens of ``sum_k |y_k| / |sum_k y_k|``."""
    was_training = model.training
    model.eval()
    total: dict[str, float] = {}
    count: dict[str, int] = {}
    with _capture_inputs(model) as captured:
        for i in range(0, tokens.shape[0], batch_size):
            model(tokens[i : i + batch_size, :-1])
            for name, bank in expert_banks(model):
                for x, gate in captured[name]:
                    y = per_expert_outputs(bank, x, gate).double()
                    ratio = y.norm(dim=2).sum(dim=1) / y.sum(dim=1).norm(dim=1).clamp_min(1e-12)
                    total[name] = total.get(name, 0.0) + float(ratio.sum())
                    count[name] = count.get(name, 0) + ratio.numel()
                captured[name].clear()
    model.train(was_training)
    per_bank = {name: total[name] / max(1, count[name]) for name in total}
    overall = float(np.mean(list(per_bank.values()))) if per_bank else None
    return {"per_bank": per_bank, "mean": overall}


@torch.no_grad()
def _sequence_losses(model: nn.Module, tokens: Tensor, batch_size: int) -> Tensor:
    out = []
    for i in range(0, tokens.shape[0], batch_size):
        chunk = tokens[i : i + batch_size]
        out.append(lm_loss(model(chunk[:, :-1]), chunk[:, 1:], reduction="none").mean(dim=1))
    return torch.cat(out).double().cpu() if out else torch.zeros(0, dtype=torch.float64)


@contextmanager
def _mean_ablated(bank: FusedExperts, k: int, mean: Tensor) -> Iterator[None]:
    """Expert ``k`` of ``bank`` replaced by the constant ``mean`` output."""

    def hook(_m: nn.Module, args: tuple, kwargs: dict, out: Tensor) -> Tensor:
        y = per_expert_outputs(bank, args[0], kwargs.get("gate"))[:, k]
        return out - y.reshape(out.shape).to(out.dtype) + mean.to(out.dtype)

    handle = bank.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def _mean_outputs(model: nn.Module, tokens: Tensor, batch_size: int) -> dict[str, Tensor]:
    """Mean output ``[K, d]`` of every expert of every bank over ``tokens``."""
    total: dict[str, Tensor] = {}
    count = 0
    with _capture_inputs(model) as captured:
        for i in range(0, tokens.shape[0], batch_size):
            chunk = tokens[i : i + batch_size, :-1]
            model(chunk)
            count += chunk.numel()
            for name, bank in expert_banks(model):
                for x, gate in captured[name]:
                    y = per_expert_outputs(bank, x, gate).double().sum(dim=0)
                    total[name] = total[name] + y if name in total else y
                captured[name].clear()
    return {name: t / max(1, count) for name, t in total.items()}


def normalized_mutual_information(counts: np.ndarray) -> float:
    """NMI of a joint count (or mass) table ``[rows, cols]``: ``2 I / (H_rows + H_cols)``.

    0 when rows and columns are independent (or one side is constant), 1 when each row
    maps to its own column. Negative entries count as 0.
    """
    p = np.clip(np.asarray(counts, dtype=np.float64), 0, None)
    total = p.sum()
    if total <= 0:
        return 0.0
    p = p / total
    pr, pc = p.sum(axis=1), p.sum(axis=0)

    def entropy(q: np.ndarray) -> float:
        q = q[q > 0]
        return float(-(q * np.log(q)).sum())

    hr, hc = entropy(pr), entropy(pc)
    if hr <= 0 or hc <= 0:
        return 0.0
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / np.outer(pr, pc)[nz])).sum())
    return max(0.0, min(1.0, 2 * mi / (hr + hc)))


def _row_means(increase: np.ndarray, labels: np.ndarray, n_rows: int) -> np.ndarray:
    out = np.zeros((n_rows, increase.shape[1]))
    for r in range(n_rows):
        sel = labels == r
        if sel.any():
            out[r] = increase[sel].mean(axis=0)
    return out


@torch.no_grad()
def mean_ablation_matrix(
    model: nn.Module,
    rows: Mapping[str, Tensor],
    batch_size: int = 32,
    permutations: int = 200,
    seed: int = 0,
) -> dict[str, Any]:
    """Loss increase per row when each (layer, expert) unit alone is mean-ablated.

    ``rows`` maps a row name (``retain``, then forget modes) to held-out tokens
    ``[M, L+1]``. Returns the units, the matrix ``increase[row] -> [per unit]``, the NMI
    of the forget rows x units matrix, and its permutation p-value (``None`` with fewer
    than two forget rows).
    """
    was_training = model.training
    model.eval()
    names = [n for n, t in rows.items() if t.shape[0] > 0]
    if not names:
        raise ValueError("mean_ablation_matrix needs at least one row with sequences")
    tokens = torch.cat([rows[n] for n in names])
    labels = np.concatenate([np.full(rows[n].shape[0], i) for i, n in enumerate(names)])
    base = _sequence_losses(model, tokens, batch_size)
    means = _mean_outputs(model, tokens, batch_size)
    units, columns = [], []
    for name, bank in expert_banks(model):
        for k in range(bank.n_experts):
            with _mean_ablated(bank, k, means[name][k]):
                columns.append((_sequence_losses(model, tokens, batch_size) - base).numpy())
            units.append(f"{name}.q{k}")
    model.train(was_training)
    increase = np.stack(columns, axis=1) if columns else np.zeros((len(labels), 0))
    matrix = _row_means(increase, labels, len(names))
    forget = [i for i, n in enumerate(names) if n != "retain"]
    result: dict[str, Any] = {
        "units": units,
        "rows": names,
        "increase": {n: matrix[i].tolist() for i, n in enumerate(names)},
        "nmi_mode_expert": None,
        "nmi_null_mean": None,
        "nmi_p_value": None,
    }
    if len(forget) < 2 or not units:
        return result
    observed, null_mean, p_value = permutation_nmi(increase, labels, forget, permutations, seed)
    result.update(nmi_mode_expert=observed, nmi_null_mean=null_mean, nmi_p_value=p_value)
    return result


def permutation_nmi(
    increase: np.ndarray,
    labels: np.ndarray,
    rows: list[int],
    permutations: int = 200,
    seed: int = 0,
) -> tuple[float, float, float]:
    """NMI of the ``rows x units`` mean-increase matrix of per-sequence ``increase``
    ``[n_seqs, units]`` grouped by ``labels``, with the mean and p-value of its null
    distribution under shuffled labels (the sequences of ``rows`` only)."""
    sel = np.isin(labels, rows)
    sub, sub_labels = increase[sel], labels[sel]
    n_rows = int(labels.max()) + 1 if labels.size else 0
    observed = normalized_mutual_information(_row_means(sub, sub_labels, n_rows)[rows])
    rng = np.random.default_rng(seed)
    null = [
        normalized_mutual_information(_row_means(sub, rng.permutation(sub_labels), n_rows)[rows])
        for _ in range(permutations)
    ]
    p_value = (1 + sum(v >= observed for v in null)) / (1 + permutations)
    return observed, float(np.mean(null)), p_value


def distinctive_tokens(mode_tokens: Tensor, retain_tokens: Tensor, vocab: int) -> Tensor:
    """Bool ``[vocab]``: target tokens ``DISTINCTIVE_RATIO`` times more frequent in the mode."""
    mode_freq = torch.bincount(mode_tokens[:, 1:].reshape(-1), minlength=vocab).double()
    retain_freq = torch.bincount(retain_tokens[:, 1:].reshape(-1), minlength=vocab).double()
    mode_share = mode_freq / mode_freq.sum().clamp_min(1)
    retain_share = (retain_freq + 1) / (retain_freq.sum() + vocab)
    return (mode_share >= DISTINCTIVE_RATIO * retain_share) & (mode_freq >= 3)


@torch.no_grad()
def distinctive_losses(
    model: nn.Module,
    rows: Mapping[str, Tensor],
    vocab: int,
    batch_size: int = 32,
) -> dict[str, dict[str, float | int]]:
    """Per forget row: mean loss on its distinctive target tokens, trained and ablated."""
    if "retain" not in rows:
        return {}
    was_training = model.training
    model.eval()
    out: dict[str, dict[str, float | int]] = {}
    for name, tokens in rows.items():
        if name == "retain" or tokens.shape[0] == 0:
            continue
        mask = distinctive_tokens(tokens, rows["retain"], vocab)[tokens[:, 1:]]
        if not bool(mask.any()):
            continue
        entry: dict[str, float | int] = {"positions": int(mask.sum())}
        for view in ("trained", "ablated"):
            losses = []
            with ablated(model) if view == "ablated" else nullcontext():
                for i in range(0, tokens.shape[0], batch_size):
                    chunk = tokens[i : i + batch_size]
                    losses.append(lm_loss(model(chunk[:, :-1]), chunk[:, 1:], reduction="none"))
            entry[view] = float(torch.cat(losses).cpu()[mask].double().mean())
        out[name] = entry
    model.train(was_training)
    return out
