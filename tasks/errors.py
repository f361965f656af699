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


class SourceUnavailable(DecodeError):
    """A source file could not be read for a reason outside its bytes: it is gone, cannot be
    opened, changed while being read, or an I/O error or time limit stopped the read. Tracks
    that fail this way are tried again by the next run (``retry`` in the tracks table).
    """


class TimeLimitExceeded(SourceUnavailable):
    """A per-file step ran past its time limit."""
