"""The project's exception family.

Every error the pipeline raises on purpose derives from :class:`MtagError`, so callers (the CLI,
the flows) can tell expected failures (bad parameters, undecodable files, schema drift) from bugs.
"""


class MtagError(Exception):
    """Base class of every error raised on purpose by this project."""


class ParameterError(MtagError, ValueError):
    """A parameter or configuration value is invalid."""


class DecodeError(MtagError):
    """An audio file cannot be read or decoded, or holds invalid samples."""


class SchemaError(MtagError):
    """A table or shard does not have the schema this code expects."""


class StoreError(MtagError):
    """The feature store is missing, locked, or inconsistent."""
