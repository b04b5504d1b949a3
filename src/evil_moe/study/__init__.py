"""The absorption study: a resumable grid of runs, leakage, verdicts, and the report.

    from evil_moe.study import analyse, load_spec, run_study, write_report

    spec, source = load_spec("quick")              # or "settle", "full", or a TOML file
    run_study(spec, "runs/study", jobs=2)          # resumable; one train() call per run
    with ResultStore.read("runs/study") as store:
        write_report(analyse(spec, store.runs()), "runs/study", source)

``evil-moe study`` does exactly this. See ``docs/study.md`` for the definitions (leakage,
retain cost, relearning, gradient norms by group), the verdict rules and the store schema.
"""

from evil_moe.study.analysis import Analysis, analyse
from evil_moe.study.report import write_report
from evil_moe.study.runner import run_study
from evil_moe.study.spec import StudyError, StudySpec, expand, load_spec
from evil_moe.study.store import ResultStore, StoreError

__all__ = [
    "Analysis",
    "ResultStore",
    "StoreError",
    "StudyError",
    "StudySpec",
    "analyse",
    "expand",
    "load_spec",
    "run_study",
    "write_report",
]
