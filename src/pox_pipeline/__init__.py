"""pox-pipeline: mpox skin-lesion classification with Hydra, DVC, MLflow and BentoML."""

__version__ = "0.1.0"
