"""Catalog files at scale: ``cluster-engine catalog import`` and ``catalog export`` in bounded memory.

Import reads the file entry by entry (JSON as a stream, a block at a time decoded by msgspec straight into
typed fields, ijson for what cannot be cut into blocks; YAML is read whole), validates each entry as it
comes, and plans it against a compact index of the images already stored: per image its
id, a digest of its identity (namespace, idc, name), a digest of its served JSON (``images.body``) and its
createdAt. An entry is unchanged iff the body it renders to is the stored one, since the body renders every
served field. The plan (``Planner``, no I/O) decides create, update or unchanged per entry and the checks
that need the whole file (duplicate entries, two entries for one image, names taken in the end state,
``--prune``); the writes go out in batches as the file is read, all in the one transaction that bumped
the revision, so a file that fails anywhere changes nothing, and a dry run rolls back after everything,
constraints included, has run.

Export streams ``images.body`` in (created_at, id) order and writes JSON or YAML incrementally, byte for
byte what ``json.dumps(…, indent=2)`` and ``yaml.safe_dump`` of the whole list write.
"""

from __future__ import annotations

from ..records import namespace_of
from .exporting import export_catalog
from .importing import import_entries, import_source
from .planning import ExistingIndex, Plan, Planner, Write
from .progress import QUIET, Progress
from .reading import CatalogSource
from .shared import CatalogFileError, CatalogInvalid, body_digest, identity_key

__all__ = [
    "QUIET",
    "CatalogFileError",
    "CatalogInvalid",
    "CatalogSource",
    "ExistingIndex",
    "Plan",
    "Planner",
    "Progress",
    "Write",
    "body_digest",
    "export_catalog",
    "identity_key",
    "import_entries",
    "import_source",
    "namespace_of",
]
