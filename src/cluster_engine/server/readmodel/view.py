"""``View``: what one org sees of the read model (the Public images and its own), the one way in for the
read endpoints: ``view.list(query)`` and ``view.get(image_id)`` answer with serialized ``Rendered`` values.
"""

from __future__ import annotations

from .. import permissions
from ..validation import ListQuery
from ..wire import Rendered
from .answers import Answers
from .entries import Entry
from .shelves import Shelf


class View:
    """One org's view, as held now (``Catalog.view`` makes it fresh and loads the org first)."""

    __slots__ = ("_answers", "_entries", "_own", "org")

    def __init__(self, org: str, own: Shelf, answers: Answers, entries: dict[str, Entry]) -> None:
        self.org, self._own, self._answers, self._entries = org, own, answers, entries

    def list(self, query: ListQuery) -> Rendered:
        """The images this org may see, filtered by ``query`` (a page of them when it asks for one)."""
        if query.limit is None and query.after is None:
            return self._answers.list_images(self.org, self._own, query.idc, query.product)
        return self._answers.page(self.org, self._own, query)

    def get(self, image_id: str) -> Rendered | None:
        """The image if this org may see it; None when it is missing or not this org's to see."""
        entry = self._entries.get(image_id)
        if entry is None or not permissions.org_sees(self.org, entry.namespace):
            return None
        return self._answers.item(entry)

    def __len__(self) -> int:
        """The org's own (Customized) images held."""
        return len(self._own)
