"""Evaluation: metrics, per-class report, calibration (ECE and reliability bins), confusion
matrix and reliability plots, training curves and the open-set confidence threshold (segment →
track aggregation is :func:`tasks.predictions.aggregate_tracks`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)

from training.calibration import reliability


def report(targets: np.ndarray, probs: np.ndarray, classes: list[str], *,
           multi_label: bool, threshold: float = 0.5) -> dict[str, Any]:
    """Metrics of ``probs`` against multi-hot ``targets`` (both ``(n, n_classes)``).

    Returns
    -------
    dict
        ``accuracy`` (exact match for multi-label), ``macro_`` and ``weighted_`` precision,
        recall and F1, ``per_class`` (list of dicts), ``confusion`` (row-normalised, single
        label), and ``roc_auc`` / ``pr_auc`` (macro, multi-label), ``n``.
    """
    if multi_label:
        y_true, y_pred = targets >= 0.5, probs >= threshold
    else:
        y_true, y_pred = targets.argmax(1), probs.argmax(1)
    labels = list(range(len(classes)))
    out: dict[str, Any] = {"n": int(len(targets)),
                           "accuracy": float(accuracy_score(y_true, y_pred))}
    for avg in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(
            y_true, y_pred, labels=None if multi_label else labels, average=avg,
            zero_division=0)
        out |= {f"{avg}_precision": float(p), f"{avg}_recall": float(r), f"{avg}_f1": float(f)}
    p, r, f, s = precision_recall_fscore_support(
        y_true, y_pred, labels=None if multi_label else labels, average=None, zero_division=0)
    out["per_class"] = [{"class": c, "precision": float(p[i]), "recall": float(r[i]),
                         "f1": float(f[i]), "support": int(s[i])} for i, c in enumerate(classes)]
    if multi_label:
        present = targets.sum(0) > 0
        if present.any():
            out["roc_auc"] = float(roc_auc_score(targets[:, present], probs[:, present],
                                                 average="macro"))
            out["pr_auc"] = float(average_precision_score(targets[:, present],
                                                          probs[:, present], average="macro"))
    else:
        cm = confusion_matrix(y_true, y_pred, labels=labels).astype(np.float64)
        out["confusion"] = (cm / np.maximum(cm.sum(1, keepdims=True), 1)).round(4).tolist()
    if len(targets):
        rel = reliability(targets, probs, multi_label=multi_label)
        out["ece"] = rel.pop("ece")
        out["reliability"] = rel
    return out


def confidence_threshold(targets: np.ndarray, probs: np.ndarray, *, multi_label: bool,
                         keep: float = 0.95) -> float:
    """Max-probability threshold that keeps ``keep`` of the correct validation predictions.

    Predictions below it are marked not ``confident`` when scoring (open set): unknown
    material is flagged instead of forced into a class.
    """
    top = probs.max(1)
    correct = (targets[np.arange(len(targets)), probs.argmax(1)] >= 0.5)
    pool = top[correct] if correct.any() else top
    if len(pool) == 0:
        return 0.5 if multi_label else 0.0
    return float(np.quantile(pool, 1.0 - keep))


def render_report(rep: dict[str, Any], title: str) -> str:
    """Plain-text report: headline metrics and the per-class table."""
    lines = [f"{title}: n={rep['n']}  accuracy={rep['accuracy']:.4f}  "
             f"macro-F1={rep['macro_f1']:.4f}  weighted-F1={rep['weighted_f1']:.4f}"
             + (f"  ECE={rep['ece']:.4f}" if "ece" in rep else "")
             + (f"  ROC-AUC={rep['roc_auc']:.4f}  PR-AUC={rep['pr_auc']:.4f}"
                if "roc_auc" in rep else "")]
    lines.append(f"  {'class':20s} {'precision':>9s} {'recall':>7s} {'f1':>7s} {'support':>8s}")
    for row in rep["per_class"]:
        lines.append(f"  {row['class'][:20]:20s} {row['precision']:9.3f} {row['recall']:7.3f} "
                     f"{row['f1']:7.3f} {row['support']:8d}")
    return "\n".join(lines)


def confusion_png(rep: dict[str, Any], classes: list[str], path: str, title: str) -> None:
    """Save the row-normalised confusion matrix as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.array(rep["confusion"])
    size = max(4.0, 0.5 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=60, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    for i in range(len(classes)):
        for j in range(len(classes)):
            if cm[i, j] >= 0.01:
                ax.text(j, i, f"{cm[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if cm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def reliability_png(rep: dict[str, Any], path: str, title: str) -> None:
    """Save a report's reliability diagram (accuracy against confidence per bin) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rel = rep["reliability"]
    edges = np.array(rel["edges"])
    mids = (edges[:-1] + edges[1:]) / 2
    acc = np.array([np.nan if a is None else a for a in rel["accuracy"]], dtype=np.float64)
    conf = np.array([np.nan if c is None else c for c in rel["confidence"]], dtype=np.float64)
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(4.5, 5.5), sharex=True,
                                   gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="calibrated")
    ax.bar(mids, np.nan_to_num(acc), width=np.diff(edges), edgecolor="tab:blue",
           color="tab:blue", alpha=0.6, label="accuracy")
    ax.plot(conf, acc, "o", color="tab:orange", markersize=4, label="mean confidence")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title} (ECE {rep.get('ece', float('nan')):.3f})")
    ax.legend(loc="upper left", fontsize=7)
    hist.bar(mids, rel["count"], width=np.diff(edges), color="grey")
    hist.set_xlabel("confidence")
    hist.set_ylabel("count")
    hist.set_xlim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def curves_png(history: list[dict[str, float]], path: str) -> None:
    """Save training loss and validation score per epoch as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(epochs, [h["train_loss"] for h in history], label="train loss")
    ax2 = ax.twinx()
    ax2.plot(epochs, [h["valid_score"] for h in history], color="tab:orange",
             label="valid macro-F1")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax2.set_ylabel("macro-F1")
    fig.legend(loc="upper center", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
