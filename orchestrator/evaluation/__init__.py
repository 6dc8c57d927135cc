"""Evaluating trained runs: ``fowkal eval``, ``fowkal show`` and ``fowkal tune-eval`` (inference-time
settings as Tune trials), and finding runs and their artifacts in MLflow."""
