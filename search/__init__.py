"""Optuna multi-objective search over recipes."""
