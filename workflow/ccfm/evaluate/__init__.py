"""Scoring: baselines, metrics, cell-eval, figures and the report check."""
