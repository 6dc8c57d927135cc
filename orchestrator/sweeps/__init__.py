"""Sweeps: ``fowkal tune`` (TPE + ASHA) and ``fowkal ablate`` (arms x seeds) on Ray Tune, the definition
files of ``search_spaces/``, the trials, their statuses and the console progress."""
