"""Reward hacking under RL: GRPO with quarantine experts (the ``rl`` extra, TRL 1.16).

``task`` (the offline hackable task and its safe grader), ``monitor`` (the reward function
and a simulated monitor), ``trainer`` (``RoutedGRPOTrainer``), ``warmstart``, ``evaluate``,
``config`` and ``run`` (the ``evil-moe rl`` recipe). See ``docs/rl.md``.
"""
