"""Classic classifiers on the segment summary statistics: ``linear`` and ``gbm``."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

CLASSIC_MODELS = ("linear", "gbm")


def build_classic(name: str, *, multi_label: bool, seed: int = 0,
                  params: dict[str, Any] | None = None, balance: bool = False) -> Pipeline:
    """A scaler + classifier pipeline (one-vs-rest for multi-label); ``balance`` weights
    classes by inverse frequency.
    """
    params = params or {}
    weight = "balanced" if balance else None
    if name == "linear":
        clf: Any = LogisticRegression(C=params.get("C", 1.0), max_iter=params.get("max_iter",
                                                                                  3000),
                                      class_weight=weight)
    elif name == "gbm":
        clf = HistGradientBoostingClassifier(
            max_iter=params.get("max_iter", 300), learning_rate=params.get("lr", 0.1),
            early_stopping="auto", random_state=seed, class_weight=weight)
    else:
        raise ValueError(f"unknown classic model {name!r}; choose from {CLASSIC_MODELS}")
    if multi_label:
        clf = OneVsRestClassifier(clf)
    return Pipeline([("scale", StandardScaler()), ("clf", clf)])


def fit_classic(model: Pipeline, x: np.ndarray, targets: np.ndarray, *,
                multi_label: bool) -> Pipeline:
    """Fit on ``x`` ``(n, d)`` and multi-hot ``targets`` ``(n, n_classes)``."""
    y = targets.astype(int) if multi_label else targets.argmax(1)
    clf = model.named_steps["clf"]
    base = clf.estimator if isinstance(clf, OneVsRestClassifier) else clf
    if isinstance(base, HistGradientBoostingClassifier):
        # the default leaf size (20) cannot split small training sets at all
        base.set_params(min_samples_leaf=max(2, min(20, len(x) // 20)))
    model.fit(x, y)
    return model


def classic_proba(model: Pipeline, x: np.ndarray, n_classes: int) -> np.ndarray:
    """Class probabilities ``(n, n_classes)``, with classes absent from training at 0."""
    proba = np.asarray(model.predict_proba(x), dtype=np.float32)
    if proba.shape[1] == n_classes:
        return proba
    out = np.zeros((len(x), n_classes), dtype=np.float32)
    out[:, model.classes_] = proba
    return out
