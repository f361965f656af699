"""Pure units of work: decoding adapter, mono/resample, segmentation, feature extraction.

Arrays and frozen config objects in, arrays and small records out. Nothing here imports Prefect,
MLflow or the feature store, builds paths from globals, or keeps global state.
"""

from tasks.version import CODE_VERSION, FEATURE_CODE_VERSION

__all__ = ["CODE_VERSION", "FEATURE_CODE_VERSION"]
