"""What the read model holds and how it changes: every Public image, and recently used orgs' shelves.

Memory stays bounded however many orgs there are: the Public shelf is always held, org shelves are held
for recently seen orgs only (least recently used go first, past ``max_images`` Customized images or
``max_orgs`` orgs, known-empty orgs included). When every org with Customized images is held the catalog
is *complete*: an org it does not hold has none, so its first request needs no database at all, and
changes to any org are applied as they come. The first eviction ends completeness.

Changes are applied idempotently: each entry remembers the revision that wrote it, and older news is
ignored. Every change drops the cached answers of the visible sets it touches (answers.py).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from ...schemas import ImageType
from ...storage.records import PUBLIC_NAMESPACE as PUBLIC
from ...storage.records import Changes, Stored
from ..compact import BodyCodec
from .answers import Answers
from .entries import Entry, make_entry
from .shelves import EMPTY, IndexedShelf, Shelf
from .view import View


class Holdings:
    """The held entries, by id and on their shelves, with the answers cached over them."""

    def __init__(
        self, *, cache_size: int, max_images: int, max_orgs: int, compress_after: int | None
    ) -> None:
        self.max_images = max_images  # Customized images held in memory, at most
        self.max_orgs = max_orgs  # org shelves (empty ones included) held in memory, at most
        self.complete = False  # every org with Customized images is held (see the module docstring)
        self._entries: dict[str, Entry] = {}
        self._public = IndexedShelf()
        self._orgs: OrderedDict[str, Shelf] = OrderedDict()
        self._org_images = 0
        self._codec = BodyCodec(train_after=compress_after)
        self._answers = Answers(self._public, self._entries, self._codec, cache_size)

    # ------------------------------------------------------------------------------------ queries

    def _shelf(self, org: str) -> Shelf | None:
        """The org's shelf if it is held (marking it recently used), else None."""
        shelf = self._orgs.get(org)
        if shelf is not None:
            self._orgs.move_to_end(org)
            return shelf
        return EMPTY if self.complete else None

    def _view(self, org: str, own: Shelf) -> View:
        return View(org, own, self._answers, self._entries)

    def held_view(self, org: str) -> View | None:
        """The org's view if its shelf is held (no database), else None: see ``Catalog.view``."""
        own = self._shelf(org)
        return None if own is None else self._view(org, own)

    def get(self, image_id: str) -> Entry | None:
        """The image if it is held: every Public image, and the Customized images of held orgs."""
        return self._entries.get(image_id)

    def __len__(self) -> int:
        return len(self._entries)

    def held(self) -> dict[str, int]:
        """What is in memory now: images by type, and org shelves."""
        return {
            ImageType.PUBLIC.value: len(self._public),
            ImageType.CUSTOMIZED.value: self._org_images,
            "orgs": len(self._orgs),
        }

    def _forget_answers(self, namespace: str) -> None:
        self._answers.forget(namespace)

    # ------------------------------------------------------------------------------------ changes

    def _hold(self, orgs: list[str], images: list[Stored]) -> dict[str, Shelf]:
        """Hold these orgs' shelves, built from all of their images (then evict past the bounds)."""
        shelves: dict[str, Shelf] = {}
        fresh: dict[str, list[Entry]] = {}  # orgs not held until now: their entries, to fill at once
        for org in orgs:
            shelf = self._orgs.get(org)
            if shelf is None:
                shelf = self._orgs[org] = Shelf()
                fresh[org] = []
                self._forget_answers(org)
            shelves[org] = shelf
        for body, image_revision in images:
            entry = make_entry(body, image_revision, self._codec)
            found = fresh.get(entry.namespace)
            if found is not None and entry.id not in self._entries:
                found.append(entry)
            else:  # its org was held already, or the image moved between orgs meanwhile: newest wins
                self._upsert(entry)
        for org, entries in fresh.items():
            shelf = shelves[org]
            if shelf:  # an image moved into it above
                for entry in entries:
                    self._upsert(entry)
                continue
            shelf.fill(entries)
            for entry in entries:
                self._entries[entry.id] = entry
            self._org_images += len(entries)
        self._evict(keep=shelves)
        return shelves

    def _evict(self, keep: Iterable[str] = ()) -> None:
        kept = set(keep)
        while (self._org_images > self.max_images or len(self._orgs) > self.max_orgs) and len(
            self._orgs
        ) > len(kept):
            org, shelf = next(iter(self._orgs.items()))
            if org in kept:
                self._orgs.move_to_end(org)
                continue
            del self._orgs[org]
            for entry in shelf.all:
                del self._entries[entry.id]
            self._org_images -= len(shelf)
            self._forget_answers(org)
            self.complete = False  # an org not held may have images again

    def _hold_public(self, images: list[Stored]) -> None:
        """The first load of the Public images (one sort, however many)."""
        entries = [make_entry(body, revision, self._codec) for body, revision in images]
        if self._public:
            for entry in entries:
                self._upsert(entry)
            return
        entries = [entry for entry in entries if entry.id not in self._entries]
        self._public.fill(entries)
        for entry in entries:
            self._entries[entry.id] = entry
        self._forget_answers(PUBLIC)

    def _apply_images(self, changes: Changes) -> None:
        for image_id, revision in changes.deleted:
            entry = self._entries.get(image_id)
            if entry is not None and entry.revision < revision:
                self._discard(entry)
        for body, revision in changes.upserted:
            self._upsert(make_entry(body, revision, self._codec))

    def _upsert(self, entry: Entry) -> None:
        current = self._entries.get(entry.id)
        if current is not None:
            if current.revision >= entry.revision:
                return
            self._discard(current)
        if entry.namespace == PUBLIC:
            self._public.add(entry)
        else:
            shelf = self._orgs.get(entry.namespace)
            if shelf is None:
                if not self.complete:
                    return
                shelf = self._orgs[entry.namespace] = Shelf()  # a complete catalog holds every org
            shelf.add(entry)
            self._org_images += 1
        self._entries[entry.id] = entry
        self._forget_answers(entry.namespace)

    def _discard(self, entry: Entry) -> None:
        del self._entries[entry.id]
        if entry.namespace == PUBLIC:
            self._public.remove(entry)
        else:
            self._orgs[entry.namespace].remove(entry)
            self._org_images -= 1
        self._forget_answers(entry.namespace)
