"""``evil-moe``: the command line. Thin: parse, validate, call the library, print.

Bad input (unknown keys, wrong types, out-of-range values, missing or empty data, unknown
domains) prints one message naming the key or file and exits with status 2, before
anything is written to ``--out``.

SIGINT (Ctrl-C) and SIGTERM (``kill``, Slurm, container runtimes) stop a command cleanly,
also when it was started with SIGINT ignored (a background job of a script): finished
work stays (stored runs, the last checkpoint), worker processes are stopped, and the exit
status is 130 (SIGINT) or 143 (SIGTERM). Further signals during that cleanup are ignored.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from evil_moe.data.corpus import DataError
from evil_moe.eval.tables import format_table
from evil_moe.io import remove_temporaries
from evil_moe.study.spec import StudyError
from evil_moe.study.store import StoreError
from evil_moe.train.config import ConfigError, RunConfig, load_config

EXIT_BAD_INPUT = 2
#: the signals that stop a command cleanly
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(KeyboardInterrupt):
    """Raised in the main thread when a stop signal arrives; ``signum`` says which."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn SIGINT and SIGTERM into :class:`Stopped` inside the block (whatever their
    inherited disposition); the previous handlers are restored on exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}

    def handler(signum: int, frame: object) -> None:
        for s in STOP_SIGNALS:  # let the cleanup finish
            signal.signal(s, signal.SIG_IGN)
        raise Stopped(signum)

    for s in STOP_SIGNALS:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old if old is not None else signal.SIG_DFL)


def _check_out_dir(out: Path, cfg: RunConfig) -> None:
    """Refuse an output directory that holds a different run."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} exists and is not a directory")
    existing = out / "config.json"
    if existing.exists():
        try:
            previous = json.loads(existing.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ConfigError(f"--out {str(out)!r} holds an unreadable config.json") from None
        if previous != json.loads(json.dumps(cfg.to_dict())):
            raise ConfigError(
                f"--out {str(out)!r} holds a run with a different config; use a new directory"
            )


def cmd_train(args: argparse.Namespace) -> int:
    from evil_moe.eval.tables import loss_table
    from evil_moe.recipes.experiment import RunMetrics, train_and_evaluate
    from evil_moe.train.devices import resolve_device
    from evil_moe.train.distributed import launched_by_torchrun, torchrun
    from evil_moe.train.memory import keep_heap
    from evil_moe.train.setup import prepare_run

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out)
    _check_out_dir(out, cfg)
    resolve_device(cfg.train.device)  # cuda on a machine without a GPU: exit 2 here
    if args.nproc is not None:
        if args.nproc < 1:
            raise ConfigError(f"--nproc must be >= 1, got {args.nproc}")
        if not launched_by_torchrun():  # start torchrun, which starts this command N times
            return torchrun(args.nproc, ["-m", "evil_moe.cli.main", *_drop_nproc(args.argv)])
    main_rank = int(os.environ.get("RANK", "0")) == 0
    if not main_rank:  # one rank of a data-parallel run: rank 0 alone prints
        args.quiet = True
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
    if (out / "metrics.json").exists():
        metrics = RunMetrics.from_dict(
            json.loads((out / "metrics.json").read_text(encoding="utf-8"))
        )
        print(f"{out} already holds this finished run; showing its results.", file=sys.stderr)
    else:
        keep_heap()
        prepared = prepare_run(cfg)  # data errors surface here, before --out is touched
        counts = prepared.model.num_parameters()
        print(
            f"evil-moe train: method={cfg.train.method} corpus={cfg.data.corpus} "
            f"params={counts['shared']:,} shared + {counts['quarantine']:,} quarantine, "
            f"{len(prepared.train)} training sequences",
            file=sys.stderr if main_rank else sys.stdout,
        )
        metrics = train_and_evaluate(cfg, out, progress=not args.quiet, prepared=prepared).metrics
    print(loss_table(metrics.to_dict()))
    tps = metrics.tokens_per_second
    if tps:
        print(f"training throughput: {tps:,.0f} tokens/s")
    print(f"wrote {out}/metrics.json")
    return 0


def _drop_nproc(argv: list[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N``."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def cmd_study(args: argparse.Namespace) -> int:
    from evil_moe.study.analysis import analyse
    from evil_moe.study.executors import RayOptions
    from evil_moe.study.report import verdict_rows, write_report
    from evil_moe.study.runner import run_study, threads_per_worker
    from evil_moe.study.spec import expand, load_spec, unique_runs
    from evil_moe.study.store import ResultStore
    from evil_moe.train.config import TRACKERS

    spec, source = load_spec(args.preset)  # bad presets fail here, before --out is touched
    jobs = args.jobs if args.jobs is not None else max(1, os.cpu_count() or 1)
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    unknown = sorted(set(args.report_to) - set(TRACKERS))
    if unknown:
        raise ConfigError(f"--report-to: unknown tracker(s) {unknown}; known: {TRACKERS}")
    if args.cpus_per_run <= 0 or args.gpus_per_run < 0:
        raise ConfigError("--cpus-per-run must be > 0 and --gpus-per-run >= 0")
    if args.executor == "ray":
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise ConfigError("--executor ray needs Ray: pip install 'evil-moe[distributed]'")
    ray_options = RayOptions(args.address, args.cpus_per_run, args.gpus_per_run)
    if args.executor == "local" and not args.report_only:  # Ray workers may have GPUs
        from evil_moe.train.devices import resolve_device

        for device in {r.config.train.device for r in unique_runs(expand(spec))}:
            resolve_device(device)  # cuda on a machine without a GPU: exit 2 here
    out = Path(args.out)
    store = ResultStore.open(
        out, spec.study_id, source, spec.to_dict(), create=not args.report_only
    )
    try:
        store.lock()
        runs = unique_runs(expand(spec))
        done = len({r.key for r in runs} & store.keys())
        if not args.report_only:
            where = (
                f"Ray tasks of {args.cpus_per_run:g} CPU(s) + {args.gpus_per_run:g} GPU(s) on "
                f"{args.address or 'a local Ray instance'}"
                if args.executor == "ray"
                else f"{jobs} worker(s) x {threads_per_worker(jobs)} thread(s)"
            )
            print(
                f"evil-moe study: {spec.study.name} ({source}): {len(runs)} runs, {done} already "
                f"finished; {where}; store {store.path}",
                file=sys.stderr,
            )
            outcome = run_study(
                spec,
                out,
                jobs,
                progress=not args.quiet,
                source=source,
                keep_runs=args.keep_runs,
                store=store,
                executor=args.executor,
                ray=ray_options,
                report_to=args.report_to,
            )
            if outcome.finished:
                rate = outcome.finished / outcome.wall_s * 3600 if outcome.wall_s else 0.0
                print(
                    f"finished {outcome.finished} run(s) in {outcome.wall_s:.0f} s "
                    f"({rate:.0f} runs/hour)",
                    file=sys.stderr,
                )
            failed = outcome.failed
        else:
            failed = []
        analysis = analyse(spec, store.runs())
    finally:
        store.close()
    command = " ".join(["evil-moe", *sys.argv[1:]]) if sys.argv[1:] else ""
    paths = write_report(analysis, out, source, command)
    print(
        format_table(
            ["claim", "block", "variant vs reference", "metric", "difference [95% CI]", "verdict"],
            verdict_rows(analysis),
        )
    )
    if not analysis.verdicts_issued:
        failed_gates = [g["gate"] for g in analysis.gates if not g["passed"]]
        print(f"no verdict issued: validity gate(s) failed: {'; '.join(failed_gates)}")
    print(f"wrote {paths['html']}, {paths['md']}, {paths['json']}")
    if analysis.missing:
        print(
            f"{len(analysis.missing)} run(s) missing: run the same command again to resume",
            file=sys.stderr,
        )
    if failed:
        print(f"evil-moe: {len(failed)} run(s) failed; see {out / 'logs'}", file=sys.stderr)
        return 1
    return 0


def cmd_rl(args: argparse.Namespace) -> int:
    try:
        from evil_moe.rl.cli import cli_rl
    except ImportError as err:
        raise ConfigError(
            f"evil-moe rl needs the rl extra (pip install 'evil-moe[rl]'): {err}"
        ) from None
    return cli_rl(args, _check_out_dir)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evil-moe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train one run and report losses before/after ablation")
    p.add_argument("--config", help="TOML config file")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--nproc",
        type=int,
        default=None,
        help="data-parallel processes on this machine (starts torchrun; train.batch_size is "
        "the global batch)",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.set_defaults(func=cmd_train)
    s = sub.add_parser(
        "study",
        help="run the absorption study grid (resumable) and write its report",
        description="Run every unfinished run of a study preset in parallel worker processes, "
        "store each finished run in DIR/results.sqlite, then write DIR/report.html, "
        "DIR/report.md and DIR/verdicts.json. Running the same command again resumes.",
    )
    s.add_argument(
        "--preset", default="quick", help="quick (default), settle, full, or a TOML file"
    )
    s.add_argument("--out", required=True, help="study directory (results store and report)")
    s.add_argument("--jobs", type=int, default=None, help="worker processes (default: CPU cores)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.add_argument("--report-only", action="store_true", help="only rebuild the report")
    s.add_argument("--keep-runs", action="store_true", help="also keep DIR/runs/<key>/ outputs")
    s.add_argument(
        "--executor",
        choices=("local", "ray"),
        default="local",
        help="local worker processes (default) or one Ray task per run",
    )
    s.add_argument(
        "--address", default=None, help="Ray cluster address (default: start a local Ray)"
    )
    s.add_argument("--cpus-per-run", type=float, default=1.0, help="Ray: CPUs per run")
    s.add_argument("--gpus-per-run", type=float, default=0.0, help="Ray: GPUs per run")
    s.add_argument(
        "--report-to",
        nargs="+",
        default=[],
        metavar="TRACKER",
        help="log every run to tensorboard and/or wandb (DIR/tracking/<key>/)",
    )
    s.set_defaults(func=cmd_study)
    r = sub.add_parser(
        "rl",
        help="GRPO with a quarantine on the offline hackable task; hack/solve rates as trained "
        "and deployed",
        description="Warm start, GRPO with route labels from a simulated monitor, evaluation "
        "(as trained, deployed, forget-scale sweep, relearning). Resumable: run it again.",
    )
    r.add_argument("--config", help="TOML config file")
    r.add_argument("--out", required=True, help="output directory")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    r.set_defaults(func=cmd_rl)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        with stop_on_signals():
            return args.func(args)
    except (ConfigError, DataError, StudyError, StoreError) as err:
        print(f"evil-moe: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt as stop:
        if getattr(args, "out", None):  # a write cut short between its file and clean-up
            remove_temporaries(args.out)
        signum = stop.signum if isinstance(stop, Stopped) else signal.SIGINT
        what = "interrupted" if signum == signal.SIGINT else "terminated"
        print(f"evil-moe: {what}; finished work is saved", file=sys.stderr)
        return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
