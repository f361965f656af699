"""Training: labels and splits, datasets over the feature store, models, the loop, evaluation,
and the one module that talks to MLflow (:mod:`training.tracking`).

Must not orchestrate (no Prefect) or decode audio: it reads features from the store only.
"""
