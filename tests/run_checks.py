"""Checks of an MLflow run that several end-to-end tests make."""

from __future__ import annotations


def input_contexts(run) -> set[str]:
    """The ``mlflow.data.context`` tags of a run's data set inputs (``training``, ``validation``)."""
    return {
        tag.value
        for dataset_input in run.inputs.dataset_inputs
        for tag in dataset_input.tags
        if tag.key == "mlflow.data.context"
    }
