"""Serialized answers, cached per visible set: whole lists, pages and single images.

A visible set is "public", or an org whose own images are in the answer: an org with nothing of its own in
the selection shares the Public answer, and a change drops only the answers of the sets it touches (one
org's for a Customized image, everyone's for a Public one).
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from collections.abc import Callable, Iterable

from ...storage.records import PUBLIC_NAMESPACE
from ..compact import BodyCodec
from ..validation import ListQuery
from ..wire import Rendered, next_link
from .entries import Entry
from .entries import sort_key as _sort_key
from .shelves import IndexedShelf, Shelf

CacheKey = tuple[str | None, str | None]


def render(entries: Iterable[Entry], unpack: Callable[[bytes], bytes], link: bytes | None = None) -> Rendered:
    return Rendered.of(b"[" + b",".join([unpack(entry.json) for entry in entries]) + b"]", link)


class Answers:
    """The answer cache over the held shelves (``public``, and the entries by id for page bounds)."""

    def __init__(
        self, public: IndexedShelf, entries: dict[str, Entry], codec: BodyCodec, cache_size: int
    ) -> None:
        self._public = public
        self._entries = entries
        self._codec = codec
        self.cache_size = cache_size  # cached list answers (whole lists and pages each), at most
        self._cache: dict[str, dict[CacheKey, Rendered]] = {}
        self._cached = 0
        self._pages: dict[str, dict[ListQuery, Rendered]] = {}
        self._paged = 0
        self._items: dict[str, tuple[Entry, Rendered]] = {}

    def list_images(self, org: str, own: Shelf, idc: str | None, product: str | None) -> Rendered:
        """The images ``org`` may see (Public + ``own``), filtered, serialized; cached per visible set."""
        mine = own.select(idc, product)
        visible = org if mine else PUBLIC_NAMESPACE
        answers = self._cache.get(visible)
        rendered = None if answers is None else answers.get((idc, product))
        if rendered is None:
            public = self._public.select(idc, product)
            # both are sorted: Timsort merges the two runs in C, several times faster than heapq.merge
            unpack = self._codec.unpack
            rendered = render(sorted([*public, *mine], key=_sort_key) if mine else public, unpack)
            if self.cache_size:
                if self._cached >= self.cache_size:
                    self._cached -= len(self._cache.pop(next(iter(self._cache))))
                self._cache.setdefault(visible, {})[(idc, product)] = rendered
                self._cached += 1
        return rendered

    def page(self, org: str, own: Shelf, query: ListQuery) -> Rendered:
        """One page of ``list_images``: up to ``query.limit`` images after ``query.after``, with a
        ``Link: <…>; rel="next"`` header when more follow."""
        mine = own.select(query.idc, query.product)
        visible = org if mine else PUBLIC_NAMESPACE
        answers = self._pages.get(visible)
        rendered = None if answers is None else answers.get(query)
        if rendered is None:
            sources = [self._public.select(query.idc, query.product)]
            if mine:
                sources.append(mine)
            if query.after is not None:
                sources = [s[bisect.bisect_right(s, query.after, key=_sort_key) :] for s in sources]
            merged = heapq.merge(*sources, key=_sort_key) if len(sources) > 1 else iter(sources[0])
            limit = query.limit or len(self._entries) + 1
            entries = list(itertools.islice(merged, limit + 1))
            link = None
            if len(entries) > limit:
                del entries[limit:]
                link = next_link(query, entries[-1].key)
            rendered = render(entries, self._codec.unpack, link)
            if self.cache_size:
                if self._paged >= self.cache_size:
                    self._paged -= len(self._pages.pop(next(iter(self._pages))))
                self._pages.setdefault(visible, {})[query] = rendered
                self._paged += 1
        return rendered

    def item(self, entry: Entry) -> Rendered:
        """One image's answer (body, ETag, headers), built once per state of the image."""
        held = self._items.get(entry.id)
        if held is not None and held[0] is entry:
            return held[1]
        rendered = Rendered.of(self._codec.unpack(entry.json))  # a new state of the image: rebuild
        if self.cache_size:
            if len(self._items) >= self.cache_size * 16:
                del self._items[next(iter(self._items))]
            self._items[entry.id] = (entry, rendered)
        return rendered

    def forget(self, namespace: str) -> None:
        """Drop the cached answers that show ``namespace``'s images (all of them for Public)."""
        if namespace == PUBLIC_NAMESPACE:
            self._cache, self._cached, self._pages, self._paged = {}, 0, {}, 0
            return
        answers = self._cache.pop(namespace, None)
        if answers is not None:
            self._cached -= len(answers)
        pages = self._pages.pop(namespace, None)
        if pages is not None:
            self._paged -= len(pages)
