"""Host-side page bookkeeping for the paged KV cache: a free list, reference counts for
pages shared between sequences (prefix sharing), per-sequence page lists and a prefix cache.

Device arrays never move here: the allocator only decides which page indices a sequence's
positions map to (its block table). A page returns to the free list when its last
reference goes, so a finished or preempted sequence gives its memory back at once. With
prefix caching, a full page registered under the hash of its prefix (`prefix_hashes`)
instead waits, unreferenced, in an LRU: a later prompt with the same prefix takes it back
(`cached_prefix`), and allocation evicts the least recently used one when the free list is empty.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from jaxkv.errors import JaxkvError


class OutOfPages(JaxkvError):
    """The pool cannot satisfy a reservation; the caller may preempt a sequence and retry."""


@dataclasses.dataclass(frozen=True)
class PageStats:
    total: int
    used: int
    free: int
    tokens: int  # valid tokens held by the tracked sequences
    fragmentation: float  # unused fraction of the token places of used pages (0 = every place holds a token)
    cached: int = 0  # unreferenced pages kept for their prefix (counted in free: evicted on demand)


def prefix_hashes(tokens: Sequence[int], page_size: int) -> list[int]:
    """One key per full page of `tokens`, chained: page i's key covers every token up to its end."""
    keys, parent = [], 0
    for start in range(0, len(tokens) - page_size + 1, page_size):
        parent = hash((parent, tuple(int(t) for t in tokens[start:start + page_size])))
        keys.append(parent)
    return keys


class PageAllocator:
    """Pages 0..num_pages-1 of one pool (the same index in every KV layer's pool)."""

    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 1 or page_size < 1:
            raise JaxkvError(f"a page pool needs num_pages >= 1 and page_size >= 1, got {num_pages} and {page_size}")
        self.num_pages, self.page_size = num_pages, page_size
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out low indices first
        self._refs = np.zeros(num_pages, np.int32)
        self._pages: dict[object, list[int]] = {}
        self._lengths: dict[object, int] = {}
        self._by_hash: dict[int, int] = {}  # prefix key -> page holding it
        self._hash_of: dict[int, int] = {}  # page -> its prefix key
        self._idle: OrderedDict[int, None] = OrderedDict()  # registered, unreferenced: least recent first

    # --- pages ------------------------------------------------------------------------------
    @property
    def free_pages(self) -> int:
        """Pages a reservation can get: the free list and the idle cached pages it may evict."""
        return len(self._free) + len(self._idle)

    def _take(self, n: int) -> list[int]:
        if n > self.free_pages:
            raise OutOfPages(f"need {n} free pages, {self.free_pages} of {self.num_pages} are free")
        taken = []
        for _ in range(n):
            if not self._free:  # evict the least recently used cached prefix page
                page, _ = self._idle.popitem(last=False)
                del self._by_hash[self._hash_of.pop(page)]
                self._free.append(page)
            taken.append(self._free.pop())
        self._refs[taken] = 1
        return taken

    def _drop(self, pages: list[int]) -> None:
        for page in pages:
            if self._refs[page] <= 0:
                raise JaxkvError(f"page {page} is freed more often than it was referenced")
            self._refs[page] -= 1
            if self._refs[page] == 0:
                if page in self._hash_of:
                    self._idle[page] = None
                else:
                    self._free.append(page)

    # --- prefix cache -------------------------------------------------------------------------
    def register(self, page: int, key: int) -> None:
        """Record that `page` (referenced, full) holds the prefix whose last page has `key`."""
        if key not in self._by_hash and page not in self._hash_of:
            self._by_hash[key], self._hash_of[page] = page, key

    def cached_prefix(self, keys: Sequence[int]) -> list[int]:
        """The pages of the longest run of `keys` (from `prefix_hashes`) that are cached."""
        pages = []
        for key in keys:
            if key not in self._by_hash:
                break
            pages.append(self._by_hash[key])
        return pages

    def refcount(self, page: int) -> int:
        return int(self._refs[page])

    # --- sequences ----------------------------------------------------------------------------
    def pages_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.page_size)

    def reserve(self, seq, length: int) -> list[int]:
        """Make room for `seq` to hold `length` tokens; returns its pages. All or nothing."""
        pages = self._pages.setdefault(seq, [])
        self._lengths.setdefault(seq, 0)
        need = self.pages_for(length) - len(pages)
        if need > 0:
            try:
                pages += self._take(need)
            except OutOfPages:
                if not pages:
                    del self._pages[seq], self._lengths[seq]
                raise
        self._lengths[seq] = max(self._lengths[seq], length)
        return list(pages)

    def share(self, seq, pages: list[int], length: int) -> None:
        """Start `seq` on existing full pages (a shared prefix of `length` tokens)."""
        if seq in self._pages:
            raise JaxkvError(f"sequence {seq!r} already has pages")
        if length > len(pages) * self.page_size:
            raise JaxkvError(f"{length} tokens do not fit in {len(pages)} shared pages")
        self._refs[pages] += 1
        for page in pages:
            self._idle.pop(page, None)  # referenced again: not evictable
        self._pages[seq], self._lengths[seq] = list(pages), length

    def own(self, seq, n: int) -> list[int]:
        """Give `seq` pages of its own in place of those of its first n that another sequence or the prefix cache
        also holds, before it rewrites them (token eviction); returns its pages. All or nothing (OutOfPages).
        The pages it leaves stay with their other holders."""
        pages = self._pages[seq]
        shared = [i for i, page in enumerate(pages[:n]) if self._refs[page] > 1 or page in self._hash_of]
        fresh = self._take(len(shared))
        self._drop([pages[i] for i in shared])
        for i, page in zip(shared, fresh):
            pages[i] = page
        return list(pages)

    def truncate(self, seq, length: int) -> None:
        """`seq` now holds `length` tokens: the pages past them go back."""
        pages = self._pages[seq]
        keep = self.pages_for(length)
        self._drop(pages[keep:])
        del pages[keep:]
        self._lengths[seq] = length

    def release(self, seq) -> None:
        """Give back a finished or preempted sequence's pages (shared ones stay while referenced)."""
        self._drop(self._pages.pop(seq))
        del self._lengths[seq]

    def holds(self, seq) -> bool:
        """Whether `seq` has pages here."""
        return seq in self._pages

    def pages(self, seq) -> list[int]:
        """The pages of `seq`, in position order."""
        return list(self._pages[seq])

    def block_table(self, seqs: list, pages_per_seq: int) -> np.ndarray:
        """int32 [len(seqs), pages_per_seq]: each sequence's pages in order, padded with page `num_pages`: the
        pool's scratch page, which no sequence owns, so a write past a sequence's pages harms no one."""
        table = np.full((len(seqs), pages_per_seq), self.num_pages, np.int32)
        for row, seq in enumerate(seqs):
            pages = self._pages[seq]
            if len(pages) > pages_per_seq:
                raise JaxkvError(f"sequence {seq!r} has {len(pages)} pages, the table holds {pages_per_seq}")
            table[row, :len(pages)] = pages
        return table

    def stats(self) -> PageStats:
        used = self.num_pages - self.free_pages
        tokens = sum(self._lengths.values())
        places = used * self.page_size  # a shared page counts once, and so do its tokens below
        distinct = {}
        for seq, pages in self._pages.items():
            for i, page in enumerate(pages):
                filled = min(self.page_size, self._lengths[seq] - i * self.page_size)
                distinct[page] = max(distinct.get(page, 0), max(filled, 0))
        return PageStats(total=self.num_pages, used=used, free=self.free_pages, tokens=tokens,
                         fragmentation=0.0 if not places else 1.0 - sum(distinct.values()) / places,
                         cached=len(self._idle))
