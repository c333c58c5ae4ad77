"""Shelves: the held entries of one namespace, sorted in list order.

``IndexedShelf`` holds the Public images with an index per filter combination (every caller reads them, so
a filtered query walks only its result); ``Shelf`` holds one org's Customized images and computes a
filtered selection on first use. Only the read model's own modules use them.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

from .entries import Entry
from .entries import sort_key as _sort_key


class IndexedShelf:
    """The Public images, sorted, with an index for every filter combination (every caller reads them,
    so each query walks only its result)."""

    __slots__ = ("all", "by_idc", "by_idc_product", "by_product")

    def __init__(self) -> None:
        self.all: list[Entry] = []
        self.by_idc: dict[str, list[Entry]] = {}
        self.by_product: dict[str, list[Entry]] = {}
        self.by_idc_product: dict[tuple[str, str], list[Entry]] = {}

    def _lists(self, entry: Entry, create: bool) -> Iterator[list[Entry]]:
        yield self.all
        yield self.by_idc.setdefault(entry.idc, []) if create else self.by_idc.get(entry.idc, [])
        for product in entry.products:
            yield self.by_product.setdefault(product, []) if create else self.by_product.get(product, [])
            pair = (entry.idc, product)
            yield self.by_idc_product.setdefault(pair, []) if create else self.by_idc_product.get(pair, [])

    def add(self, entry: Entry) -> None:
        for items in self._lists(entry, create=True):
            bisect.insort(items, entry, key=_sort_key)

    def fill(self, entries: list[Entry]) -> None:
        """Hold ``entries`` on an empty shelf: one sort, then appends that keep every list sorted."""
        assert not self.all
        entries.sort(key=_sort_key)
        by_idc, by_product, by_pair = self.by_idc, self.by_product, self.by_idc_product
        for entry in entries:
            idc = entry.idc
            by_idc.setdefault(idc, []).append(entry)
            for product in entry.products:
                by_product.setdefault(product, []).append(entry)
                by_pair.setdefault((idc, product), []).append(entry)
        self.all = entries

    def remove(self, entry: Entry) -> None:
        for items in self._lists(entry, create=False):
            at = bisect.bisect_left(items, entry.key, key=_sort_key)
            if at < len(items) and items[at] is entry:
                del items[at]
        if not self.by_idc.get(entry.idc):
            self.by_idc.pop(entry.idc, None)
        for product in entry.products:
            if not self.by_product.get(product):
                self.by_product.pop(product, None)
            if not self.by_idc_product.get((entry.idc, product)):
                self.by_idc_product.pop((entry.idc, product), None)

    def select(self, idc: str | None, product: str | None) -> list[Entry]:
        if idc is not None and product is not None:
            return self.by_idc_product.get((idc, product), [])
        if idc is not None:
            return self.by_idc.get(idc, [])
        if product is not None:
            return self.by_product.get(product, [])
        return self.all

    def __len__(self) -> int:
        return len(self.all)


class Shelf:
    """One org's Customized images, sorted; a filtered selection is computed on first use and kept
    until the shelf changes. An org has tens of images, so this is cheaper to build than indexes (the
    cold path builds one per org's first request) and holds only the selections asked for."""

    __slots__ = ("_selections", "all")
    MAX_SELECTIONS = 64  # kept per shelf; past this they are dropped and computed again when asked

    def __init__(self) -> None:
        self.all: list[Entry] = []
        self._selections: dict[tuple[str | None, str | None], list[Entry]] = {}

    def add(self, entry: Entry) -> None:
        bisect.insort(self.all, entry, key=_sort_key)
        self._selections.clear()

    def remove(self, entry: Entry) -> None:
        at = bisect.bisect_left(self.all, entry.key, key=_sort_key)
        if at < len(self.all) and self.all[at] is entry:
            del self.all[at]
        self._selections.clear()

    def fill(self, entries: list[Entry]) -> None:
        """Hold ``entries`` (an empty shelf's first images): one sort."""
        assert not self.all
        entries.sort(key=_sort_key)
        self.all = entries

    def select(self, idc: str | None, product: str | None) -> list[Entry]:
        if idc is None and product is None:
            return self.all
        selection = self._selections.get((idc, product))
        if selection is None:
            selection = [
                entry
                for entry in self.all
                if (idc is None or entry.idc == idc) and (product is None or product in entry.products)
            ]
            if len(self._selections) >= self.MAX_SELECTIONS:
                self._selections.clear()
            self._selections[(idc, product)] = selection
        return selection

    def __len__(self) -> int:
        return len(self.all)


EMPTY = Shelf()  # what a complete catalog answers for an org it does not hold (never given images)
