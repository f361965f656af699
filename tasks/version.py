"""Code versions that name what the code produces.

``FEATURE_CODE_VERSION`` changes whenever feature arithmetic changes (it is hashed into the
feature-set id, so a change writes a new feature-set version beside the old one).
``CODE_VERSION`` is the package version, recorded for lineage only.
"""

from importlib import metadata

FEATURE_CODE_VERSION = "features-2"

try:
    CODE_VERSION = metadata.version("mtag")
except metadata.PackageNotFoundError:  # running from a source tree that is not installed
    CODE_VERSION = "0.0.0+source"
