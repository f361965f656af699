"""Code versions that name what the code produces.

``FEATURE_CODE_VERSION`` changes whenever feature arithmetic changes what a feature means or
its values beyond float32 rounding (it is hashed into the feature-set id, so a change writes a
new feature-set version beside the old one, and models trained on the old one are not fed the
new features). Optimisations that only reorder float32 sums (the banded mel product, the
compiled centroid/bandwidth/rolloff pass, hop-block RMS) keep the version: their outputs stay
within the tolerances against librosa that ``tests/tasks/test_features.py`` checks.
``CODE_VERSION`` is the package version, recorded for lineage only.
"""

from importlib import metadata

FEATURE_CODE_VERSION = "features-3"

try:
    CODE_VERSION = metadata.version("mtag")
except metadata.PackageNotFoundError:  # running from a source tree that is not installed
    CODE_VERSION = "0.0.0+source"
