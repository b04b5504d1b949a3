"""Recipes: thin compositions of the layers below for the CLI and the study.

``train_and_evaluate`` is ``evil-moe train`` (train -> evaluate -> write);
``measure_study_run`` is one run of the absorption study (train -> evaluate -> measure).
"""

from evil_moe.recipes.experiment import RunMetrics, RunResult, evaluate_run, train_and_evaluate
from evil_moe.recipes.study_run import StudyRunResult, measure_study_run, seen_tokens

__all__ = [
    "RunMetrics",
    "RunResult",
    "StudyRunResult",
    "evaluate_run",
    "measure_study_run",
    "seen_tokens",
    "train_and_evaluate",
]
