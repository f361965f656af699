"""What a saved tagger is, read from its ``meta.json`` alone: no torch, no sklearn.

A command that only needs to know a model (its classes, input, feature set, embedding size)
reads this instead of loading it (:mod:`training.artifact` imports torch: seconds of CPU a
``mtag score`` with nothing to do never needs).
"""

from __future__ import annotations

import json
import os
from typing import Any

META = "meta.json"


def read_meta(directory: str) -> dict[str, Any]:
    """``meta.json`` of an artifact folder."""
    with open(os.path.join(directory, META)) as fh:
        data: dict[str, Any] = json.load(fh)
    return data


def embed_dim(directory: str, meta: dict[str, Any] | None = None) -> int:
    """Size of the embeddings the model in ``directory`` gives (an ensemble: the sum of its
    members'), as :attr:`training.artifact.Predictor.embed_dim` reports once loaded.
    """
    meta = meta if meta is not None else read_meta(directory)
    if meta["kind"] == "ensemble":
        return sum(embed_dim(os.path.join(directory, m["path"])) for m in meta["members"])
    return single_embed_dim(meta, classic=meta["kind"] == "sklearn")


def single_embed_dim(meta: dict[str, Any], *, classic: bool) -> int:
    """Embedding size of one (not ensemble) model: a classic model's embedding is its
    standardised feature row, a network's its ``embed_dim``.
    """
    if classic:
        return len(meta.get("features") or meta["columns"])
    return int(meta["model_config"]["embed_dim"])
