"""What the store refuses, in its own terms (the server maps each onto its HTTP answer: server/errors.py).

    StoreError
     ├── Duplicate       an image with this name already exists in this idc for this owner
     └── ImageMissing    no image has this id (or it went away meanwhile)

A catalog file's problems are ``catalog_files.CatalogInvalid``, an ``Invalid`` (cluster_engine/invalid.py).
"""

from __future__ import annotations


class StoreError(Exception):
    """A write the store refused; the message says why, in words a caller may be shown."""


class Duplicate(StoreError):
    pass


class ImageMissing(StoreError):
    pass
