"""One training run on Ray: ``fowkal train``, the TorchTrainer it launches, storage, resources, and what
every run leaves in MLflow (metrics through a spool, checkpoints, the family's files)."""
