"""Evaluation: metrics, judges and win rates, report, lm-eval bridge."""
