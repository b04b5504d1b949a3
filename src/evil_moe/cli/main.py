"""``evil-moe``: the command line. Thin: parse, validate, call the library, print.

Bad input (unknown keys, wrong types, out-of-range values, missing or empty data, unknown
domains) prints one message naming the key or file and exits with status 2, before
anything is written to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from evil_moe.data.corpus import DataError
from evil_moe.train.config import ConfigError, RunConfig, load_config

EXIT_BAD_INPUT = 2


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
    from evil_moe.train.loop import train
    from evil_moe.train.setup import prepare_run

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out)
    _check_out_dir(out, cfg)
    if (out / "metrics.json").exists():
        metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
        print(f"{out} already holds this finished run; showing its results.", file=sys.stderr)
    else:
        prepared = prepare_run(cfg)  # data errors surface here, before --out is touched
        counts = prepared.model.num_parameters()
        print(
            f"evil-moe train: method={cfg.train.method} corpus={cfg.data.corpus} "
            f"params={counts['shared']:,} shared + {counts['quarantine']:,} quarantine, "
            f"{len(prepared.train)} training sequences",
            file=sys.stderr,
        )
        metrics = train(cfg, out, progress=not args.quiet, prepared=prepared).metrics
    print(loss_table(metrics))
    tps = metrics.get("tokens_per_second")
    if tps:
        print(f"training throughput: {tps:,.0f} tokens/s")
    print(f"wrote {out}/metrics.json")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evil-moe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train one run and report losses before/after ablation")
    p.add_argument("--config", help="TOML config file")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.set_defaults(func=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError) as err:
        print(f"evil-moe: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("evil-moe: interrupted; finished work is saved", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
