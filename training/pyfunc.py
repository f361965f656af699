"""The MLflow pyfunc flavour of a tagger: ``mlflow.pyfunc.load_model(uri).predict(x)``.

Input: ``(batch, rows, frames)`` float32 arrays of the stored features (log-mel or MFCC) for
neural models, or a DataFrame of the ``segments`` summary columns for ``linear``/``gbm``.
Output: class probabilities ``(batch, n_classes)`` in ``meta['classes']`` order, or with
``params={"output": "embedding"}`` the embeddings. Needs the ``mtag`` package installed.
"""

from __future__ import annotations

import warnings

import mlflow.pyfunc

from training import artifact

# the input is a tensor or a frame, described by the logged signature instead of type hints
warnings.filterwarnings("ignore", message="Add type hints to the `predict` method")


class TaggerPyfunc(mlflow.pyfunc.PythonModel):
    """Wraps :class:`training.artifact.Predictor`."""

    def load_context(self, context):  # type: ignore[no-untyped-def]
        self.predictor = artifact.load(context.artifacts["artifact"])

    # no type hints: MLflow would read them as a (list-based) input schema
    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        output = (params or {}).get("output", "probabilities")
        probs, emb = self.predictor.predict(model_input, embeddings=output == "embedding")
        return emb if output == "embedding" else probs
