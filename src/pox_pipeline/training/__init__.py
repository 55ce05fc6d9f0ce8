"""Training, evaluation, metrics, MLflow tracking and cross-validation."""
