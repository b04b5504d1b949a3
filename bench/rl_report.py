"""The RL study's report: means and 95% t-intervals over seeds, seed-paired contrasts.

Reads ``<out>/runs/<arm>-s<seed>/metrics.json`` and writes ``report.json`` and
``report.md`` next to them (no weights, no checkpoints).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from evil_moe.rl.task import MODES
from evil_moe.study.stats import t_interval

VIEWS = ("trained", "deployed")
#: relearning is reported for runs whose ablation removed at least this much hack rate
RELEARN_MIN_DROP = 0.05


def _load(out: Path, arms: Sequence[str], seeds: Sequence[int]) -> dict[str, dict[int, dict]]:
    runs: dict[str, dict[int, dict]] = {}
    for arm in arms:
        for seed in seeds:
            path = out / "runs" / f"{arm}-s{seed}" / "metrics.json"
            if path.exists():
                metrics = json.loads(path.read_text(encoding="utf-8"))
                redo = path.with_name("relearning.json")  # a later relearning pass wins
                if redo.exists():
                    metrics["relearning"] = json.loads(redo.read_text(encoding="utf-8"))
                runs.setdefault(arm, {})[seed] = metrics
    return runs


def _metric(m: dict[str, Any], key: str) -> float | None:
    """``view.rate`` or ``view.mode`` (hack rate of one mode), ``drop`` (trained -
    deployed hack), ``relearn`` (steps; the cap + eval interval when never back)."""
    if key == "drop":
        return m["trained"]["hack"] - m["deployed"]["hack"]
    if key == "relearn":  # only where ablation removed >= RELEARN_MIN_DROP of the hack rate
        r = m.get("relearning")
        if not r or r["curve"][0][1] > r["target"] - RELEARN_MIN_DROP:
            return None
        return r["steps"] if r["steps"] is not None else r["cap"] + 1
    if key.startswith("warm."):
        return m["warm_start"]["heldout"][key[5:]]
    if key.startswith("scale:"):  # "scale:<s>:<rate>"
        _, scale, name = key.split(":")
        s = m["forget_scale"][scale]
    else:
        view, _, name = key.partition(".")
        s = m[view]
    return s["hack_by_mode"][name] if name in MODES else s[name]


def _interval(values: list[float | None]) -> dict[str, Any]:
    return t_interval([v for v in values if v is not None]).to_dict()


def _fmt(iv: dict[str, Any], spec: str = ".3f") -> str:
    if iv["mean"] is None:
        return "n/a"
    if iv["lo"] is None:
        return f"{iv['mean']:{spec}}"
    return f"{iv['mean']:{spec}} [{iv['lo']:{spec}}, {iv['hi']:{spec}}]"


def summarize_arms(runs: dict[str, dict[int, dict]]) -> dict[str, dict[str, Any]]:
    keys = ["warm.hack", "warm.solve", "drop", "relearn"]
    for view in VIEWS:
        keys += [f"{view}.hack", f"{view}.solve", *(f"{view}.{m}" for m in MODES)]
    out: dict[str, dict[str, Any]] = {}
    for arm, by_seed in runs.items():
        ms = list(by_seed.values())
        row = {k: _interval([_metric(m, k) for m in ms]) for k in keys}
        scales = sorted(ms[0]["forget_scale"], key=float)
        row["forget_scale"] = {
            s: {
                k: _interval([_metric(m, f"scale:{s}:{k}") for m in ms])
                for k in ("hack", "solve", *MODES)
            }
            for s in scales
        }
        norms: dict[str, Any] = {}
        for group in ms[0].get("gradient_norms_by_group") or {}:
            for part in ("quarantine", "shared"):
                vals = [(m["gradient_norms_by_group"] or {}).get(group, {}).get(part) for m in ms]
                norms[f"{group}.{part}"] = _interval(vals)
        row["gradient_norms_by_group"] = norms
        row["seconds_per_step"] = _interval([m["train"]["seconds_per_step"] for m in ms])
        row["wall_seconds"] = sum(m["wall_seconds"] for m in ms)
        row["seeds"] = sorted(by_seed)
        out[arm] = row
    return out


def paired(runs: dict[str, dict[int, dict]], a: str, b: str, key: str) -> dict[str, Any]:
    seeds = sorted(set(runs.get(a, {})) & set(runs.get(b, {})))
    diffs = [_metric(runs[a][s], key) - _metric(runs[b][s], key) for s in seeds]  # type: ignore[operator]
    return _interval(diffs)


def write_report(
    out: Path,
    seeds: Sequence[int],
    arms: Sequence[str],
    contrasts: Sequence[tuple[str, str, str]],
    command: dict[str, Any],
) -> tuple[Path, Path]:
    runs = _load(out, arms, seeds)
    summary = summarize_arms(runs)
    keys = ["deployed.hack", "drop", "deployed.solve", *(f"deployed.{m}" for m in MODES)]
    contrast_rows = []
    for a, b, what in contrasts:
        if a in runs and b in runs:
            contrast_rows.append(
                {
                    "treatment": a,
                    "control": b,
                    "what": what,
                    **{k: paired(runs, a, b, k) for k in keys},
                }
            )
    any_run = next(iter(next(iter(runs.values())).values())) if runs else {}
    relearn_commits = sorted(
        {
            m["relearning"].get("commit", command["commit"])
            for r in runs.values()
            for m in r.values()
            if m.get("relearning")
        }
    )
    provenance = out / "provenance.json"  # the runs' own commands, when several made them
    report = {
        **command,
        "provenance": json.loads(provenance.read_text()) if provenance.exists() else [],
        "relearning_commits": relearn_commits,
        "seeds": list(seeds),
        "flagged_modes": any_run.get("flagged_modes"),
        "arms": summary,
        "contrasts": contrast_rows,
    }
    json_path = out / "report.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    md_path = out / "report.md"
    md_path.write_text(_markdown(report), encoding="utf-8")
    return md_path, json_path


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _markdown(report: dict[str, Any]) -> str:
    arms = report["arms"]
    flagged = report.get("flagged_modes") or []
    never = [m for m in MODES if m not in flagged]
    lines = [
        "# RL study: GRPO with a quarantine on the hackable task",
        "",
        f"Command: `{report['command']}`  ",
        f"Commit: `{report['commit']}`  ",
        *(
            f"Runs: `{p['command']}` at `{p['commit']}` ({p['what']})  "
            for p in report["provenance"]
        ),
        f"Relearning measured at: {', '.join(f'`{c}`' for c in report['relearning_commits'])}  ",
        f"Seeds: {report['seeds']}; cells are means with 95% t-intervals over seeds. "
        f"Monitor flags {', '.join(flagged)} at the configured recall; never flags "
        f"{', '.join(never) or 'nothing'}.",
        "",
        "## Hack and solve rates, as trained and deployed (quarantine ablated)",
        "",
    ]
    rows = []
    for arm, r in arms.items():
        rows.append(
            [
                arm,
                _fmt(r["warm.hack"]),
                _fmt(r["trained.hack"]),
                _fmt(r["deployed.hack"]),
                _fmt(r["trained.solve"]),
                _fmt(r["deployed.solve"]),
                _fmt(r["relearn"], ".0f") + f" (n={r['relearn']['n']})",
            ]
        )
    lines += _table(
        [
            "arm",
            "warm-start hack",
            "hack trained",
            "hack deployed",
            "solve trained",
            "solve deployed",
            "relearn steps*",
        ],
        rows,
    )
    lines += [
        "",
        f"*GRPO steps without intervention after ablation until the held-out hack rate is back "
        f"at the as-trained rate (cap 40; 41 = not back), over the runs whose ablation removed "
        f">= {RELEARN_MIN_DROP} of the hack rate (n of 3).",
        "",
        "## Hack rate per mode, trained / deployed",
        "",
    ]
    rows = []
    for arm, r in arms.items():
        cells = [f"{_fmt(r[f'trained.{m}'])} / {_fmt(r[f'deployed.{m}'])}" for m in MODES]
        rows.append([arm, *cells])
    lines += _table(["arm", *(m + (" (never flagged)" if m in never else "") for m in MODES)], rows)
    lines += ["", "## Seed-paired contrasts (treatment - control)", ""]
    rows = []
    for c in report["contrasts"]:
        rows.append(
            [
                f"{c['treatment']} - {c['control']}",
                c["what"],
                _fmt(c["deployed.hack"]),
                _fmt(c["drop"]),
                _fmt(c["deployed.solve"]),
                *(_fmt(c[f"deployed.{m}"]) for m in never),
            ]
        )
    lines += _table(
        [
            "contrast",
            "isolates",
            "deployed hack",
            "ablation drop",
            "deployed solve",
            *(f"deployed {m}" for m in never),
        ],
        rows,
    )
    lines += ["", "## Forget-scale sweep: hack rate (solve rate) at quarantine scale s", ""]
    scales = sorted(next(iter(arms.values()))["forget_scale"], key=float) if arms else []
    rows = []
    for arm, r in arms.items():
        fs = r["forget_scale"]
        rows.append(
            [arm, *(f"{fs[s]['hack']['mean']:.3f} ({fs[s]['solve']['mean']:.3f})" for s in scales)]
        )
    lines += _table(["arm", *(f"s={s}" for s in scales)], rows)
    lines += ["", "## Gradient norms by group (RMS per parameter, unrouted, trained policy)", ""]
    rows = []
    for arm, r in arms.items():
        n = r["gradient_norms_by_group"]
        rows.append([arm, *(_fmt(n.get(k, {"mean": None}), ".1e") for k in sorted(n))])
    first = next(iter(arms.values()), {})
    lines += _table(["arm", *sorted(first.get("gradient_norms_by_group", {}))], rows)
    lines += ["", "## Cost", ""]
    rows = [[a, _fmt(r["seconds_per_step"]), f"{r['wall_seconds']:.0f}"] for a, r in arms.items()]
    lines += _table(["arm", "s per GRPO step", "wall s (all seeds)"], rows)
    return "\n".join(lines) + "\n"
