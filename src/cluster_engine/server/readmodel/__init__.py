"""The read model (see catalog.py): ``Catalog`` and the per-org ``View`` the read endpoints answer from."""

from __future__ import annotations

from .catalog import Catalog
from .view import View

__all__ = ["Catalog", "View"]
