"""The MLflow pyfunc flavour of a tagger: ``mlflow.pyfunc.load_model(uri).predict(x)``.

Input: ``(batch, rows, frames)`` float32 arrays of the stored features (log-mel or MFCC) for
neural models, or a DataFrame of the ``segments`` summary columns for ``linear``/``gbm``.
An ensemble (:mod:`training.ensemble`) takes its members' input: that of a single model when
they share one, else a dict ``{"summary": frame, "mfcc": array, ...}`` (``meta['inputs']``
lists the kinds) holding the same segments in each entry.
Output: class probabilities ``(batch, n_classes)`` in ``meta['classes']`` order, or with
``params={"output": "embedding"}`` the embeddings. Needs the ``mtag`` package installed.
"""

from __future__ import annotations

import warnings
from typing import Any

from mlflow.pyfunc import PythonModel

from training import artifact

# The input is a tensor or a frame, described by the logged signature, not by type hints
# (MLflow would read hints as a list-based input schema). MLflow warns about the missing hints
# when the class is defined, under its own "once" filter, so a filter of ours cannot hide it:
# the definition records (and drops) its warnings instead.
with warnings.catch_warnings(record=True):

    class TaggerPyfunc(PythonModel):
        """Wraps :class:`training.artifact.Predictor` (or an ensemble of them)."""

        def load_context(self, context: Any) -> None:
            self.predictor = artifact.load(context.artifacts["artifact"])

        def predict(self, context: Any, model_input: Any,
                    params: dict[str, Any] | None = None) -> Any:
            output = (params or {}).get("output", "probabilities")
            probs, emb = self.predictor.predict(model_input, embeddings=output == "embedding")
            return emb if output == "embedding" else probs
