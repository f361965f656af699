"""The feature store: schemas, shard writers and readers, manifests and commits, query views.

Owns every path and every byte written under a store root (a local folder or an fsspec URL).
Must not contain model code or orchestration.
"""
