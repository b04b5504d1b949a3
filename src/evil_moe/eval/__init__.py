"""Measurements: held-out losses before/after ablation, leakage, relearning, gradient
norms by group, and the specialisation of K quarantine experts."""

from evil_moe.eval.gradnorms import group_gradient_norms
from evil_moe.eval.leakage import BaselineCurve, LeakageEstimate
from evil_moe.eval.losses import evaluate_losses, mean_token_loss
from evil_moe.eval.relearning import relearning_steps
from evil_moe.eval.specialization import specialization_report

__all__ = [
    "BaselineCurve",
    "LeakageEstimate",
    "evaluate_losses",
    "group_gradient_norms",
    "mean_token_loss",
    "relearning_steps",
    "specialization_report",
]
