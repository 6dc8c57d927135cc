"""``fowkal report``: read a sweep back from MLflow, compute its tables and intervals, draw, render."""
