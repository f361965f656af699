"""A trained tagger on disk, and the predictor that loads it.

An artifact folder holds ``meta.json`` (kind, model config, classes, multi-label flag,
open-set threshold and detector summary, calibration temperature, pooling of a classic
model, feature set and its config, input feature and shape, label set, code version,
tracks trained on) and the weights: ``weights.pt`` (torch state dict) or ``model.joblib``
(sklearn), and the open-set detector's ``novelty.npz`` (:mod:`training.novelty`). An ensemble
(``kind`` ``"ensemble"``, :mod:`training.ensemble`) holds no weights of its own: its members
are artifact folders under ``members/`` (``meta['members']`` names each one's ``path``,
``model``, ``weight`` and ``score``).
:class:`Predictor` gives probabilities and embeddings from stored features; the MLflow pyfunc
(:mod:`training.pyfunc`) wraps it; :func:`load` returns a predictor of any kind.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from tasks.errors import ParameterError
from training.calibration import apply_temperature, log_scores
from training.classic import classic_proba, pool_segments
from training.meta import META, read_meta, single_embed_dim
from training.models import (
    Tagger,
    build_model,
    config_from_dict,
    forward_batches,
    inference_batch_size,
)
from training.novelty import NoveltyDetector

TORCH_WEIGHTS = "weights.pt"
SKLEARN_MODEL = "model.joblib"

ModelInput = np.ndarray | pd.DataFrame | Mapping[str, Any]
"""What :meth:`Predictor.predict` takes: its input, or a dict ``{kind: input}`` holding it
under :attr:`Predictor.input` (an ensemble of mixed inputs needs such a dict)."""


@dataclass
class Predictor:
    """Probabilities and embeddings from a saved model.

    ``input`` is ``"logmel"``/``"mfcc"`` (``(batch, rows, frames)`` float32 arrays) or
    ``"summary"`` (a DataFrame with :attr:`input_columns`); an ensemble's may be ``"mixed"``
    (:mod:`training.ensemble`).
    """

    meta: dict[str, Any]
    torch_model: Tagger | None = None
    sklearn_model: Any = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    novelty: NoveltyDetector | None = None
    """Open-set detector (:mod:`training.novelty`); None: the probability threshold decides."""
    _folded: Tagger | None = field(default=None, init=False, repr=False, compare=False)
    """:attr:`torch_model` with its batch norms folded (:meth:`Tagger.folded`), made at the
    first :meth:`predict`: what predictions run on. :attr:`torch_model` stays as trained (it
    is what :meth:`save` writes); its weights are fixed once this predictor has predicted."""

    @property
    def input(self) -> str:
        """Input kind: ``logmel``, ``mfcc``, ``summary`` (or an ensemble's ``mixed``)."""
        return str(self.meta["input"])

    @property
    def embed_dim(self) -> int:
        """Size of the embeddings :meth:`predict` returns."""
        return single_embed_dim(self.meta, classic=self.sklearn_model is not None)

    @property
    def classes(self) -> list[str]:
        """Output order of the probabilities."""
        return list(self.meta["classes"])

    @property
    def temperature(self) -> float:
        """Temperature of the probabilities (1: uncalibrated; see :mod:`training.calibration`)."""
        return float(self.meta.get("temperature", 1.0))

    @property
    def pooled(self) -> bool:
        """Whether a summary model pools each track's segments into one row."""
        return self.meta.get("pooling") == "track"

    @property
    def input_columns(self) -> list[str]:
        """Columns a ``summary`` input frame needs: a pooled model also needs ``track_id`` and
        ``segment`` (every segment of a track in the same call).
        """
        return [*(["track_id", "segment"] if self.pooled else []), *self.meta["columns"]]

    def predict(self, x: ModelInput, *, embeddings: bool = False,
                batch_size: int | None = None, raw: bool = False
                ) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities ``(n, n_classes)`` and, if asked, embeddings ``(n, d)`` (float32).

        ``batch_size``: rows a forward pass takes; by default
        :func:`training.models.inference_batch_size` of a row's size and the device.

        Probabilities are calibrated at :attr:`temperature`; ``raw`` returns the uncalibrated
        log-domain scores instead (logits, or a classic model's log-probabilities / log-odds).
        A pooled model gives every row of a track that track's scores and embedding. A dict
        ``x`` is read at :attr:`input`.
        """
        data = x[self.input] if isinstance(x, Mapping) else x
        multi = bool(self.meta["multi_label"])
        if self.sklearn_model is not None:
            scores, emb = self._classic_scores(data, embeddings)
            if raw:
                return scores.astype(np.float32), emb
            return apply_temperature(scores, self.temperature, multi_label=multi), emb
        model = self._inference_model()
        arr = np.asarray(data, dtype=np.float32)
        if batch_size is None:
            batch_size = inference_batch_size(int(np.prod(arr.shape[1:])), self.device.type)
        # copies: rows may be read-only views of memory-mapped shards
        batches = (torch.from_numpy(np.array(arr[i:i + batch_size]))
                   for i in range(0, len(arr), batch_size))
        return forward_batches(model, batches, self.device, multi_label=multi,
                               scale=None if raw else 1.0 / self.temperature,
                               embeddings=embeddings)

    def _inference_model(self) -> Tagger:
        """What predictions run on: the folded twin of :attr:`torch_model`, made once."""
        assert self.torch_model is not None
        if self._folded is None:
            self._folded = self.torch_model.eval().folded()
        return self._folded

    def _classic_scores(self, x: np.ndarray | pd.DataFrame, embeddings: bool
                        ) -> tuple[np.ndarray, np.ndarray | None]:
        """Log-domain scores (float64) and embeddings of a classic model, one row per input
        row.
        """
        frame = x if isinstance(x, pd.DataFrame) else pd.DataFrame(
            x, columns=self.input_columns)
        feats = frame[self.meta["columns"]].to_numpy(np.float32)
        inverse = None
        if self.pooled:
            if "track_id" not in frame.columns:
                raise ParameterError("this model pools each track's segments: its input "
                                     "needs a track_id column (and segment)")
            _, feats, inverse = pool_segments(
                frame["track_id"].to_numpy(object),
                frame["segment"].to_numpy() if "segment" in frame.columns else None, feats)
        probs = classic_proba(self.sklearn_model, feats, len(self.classes), dtype=np.float64)
        scores = log_scores(probs, multi_label=bool(self.meta["multi_label"]))
        emb = None
        if embeddings:
            scaler = getattr(self.sklearn_model, "named_steps", {}).get("scale")
            emb = (scaler.transform(feats) if scaler is not None else feats).astype(np.float32)
        if inverse is not None:
            scores = scores[inverse]
            emb = emb[inverse] if emb is not None else None
        return scores, emb

    def save(self, directory: str) -> str:
        """Write this model as an artifact folder (see :func:`save`); return its path."""
        return save(directory, self.meta, torch_model=self.torch_model,
                    sklearn_model=self.sklearn_model, novelty=self.novelty)


def write_meta(directory: str, meta: dict[str, Any]) -> None:
    """Write ``meta.json`` into ``directory`` (created if missing)."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, META), "w") as fh:
        json.dump(meta, fh, indent=1, sort_keys=True, default=str)


def save(directory: str, meta: dict[str, Any], *, torch_model: Tagger | None = None,
         sklearn_model: Any = None, novelty: NoveltyDetector | None = None) -> str:
    """Write an artifact folder; return its path."""
    os.makedirs(directory, exist_ok=True)
    if novelty is not None:
        novelty.save(directory)
    if torch_model is not None:
        torch.save({k: v.detach().cpu() for k, v in torch_model.state_dict().items()},
                   os.path.join(directory, TORCH_WEIGHTS))
        meta = meta | {"kind": "torch", "rows": torch_model.rows}
    else:
        import joblib

        joblib.dump(sklearn_model, os.path.join(directory, SKLEARN_MODEL))
        meta = meta | {"kind": "sklearn"}
    write_meta(directory, meta)
    return directory


def load(directory: str, *, device: str | None = None) -> Predictor:
    """Load an artifact folder written by :func:`save` (or an ensemble's, written by
    :meth:`training.ensemble.Ensemble.save`).
    """
    meta = read_meta(directory)
    if meta["kind"] == "ensemble":
        from training.ensemble import load_ensemble

        return load_ensemble(directory, meta, device=device)
    novelty = NoveltyDetector.load(directory)
    if meta["kind"] == "sklearn":
        import joblib

        return Predictor(meta, sklearn_model=joblib.load(os.path.join(directory,
                                                                       SKLEARN_MODEL)),
                         novelty=novelty)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = build_model(config_from_dict(meta["model_config"]), meta["rows"],
                        len(meta["classes"]))
    state = torch.load(os.path.join(directory, TORCH_WEIGHTS), map_location="cpu",
                       weights_only=True)
    model.load_state_dict(state)
    model.place(dev).eval()
    return Predictor(meta, torch_model=model, device=dev, novelty=novelty)

