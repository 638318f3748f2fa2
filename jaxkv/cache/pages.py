"""Host-side page bookkeeping for the paged KV cache: a free list, reference counts for
pages shared between sequences (prefix sharing), and per-sequence page lists.

Device arrays never move here: the allocator only decides which page indices a sequence's
positions map to (its block table). A page returns to the free list when its last
reference goes, so a finished or preempted sequence gives its memory back at once.
"""

from __future__ import annotations

import dataclasses

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
    fragmentation: float  # unused fraction of the slots of used pages (0 = every slot holds a token)


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

    # --- pages ------------------------------------------------------------------------------
    @property
    def free_pages(self) -> int:
        return len(self._free)

    def _take(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfPages(f"need {n} free pages, {len(self._free)} of {self.num_pages} are free")
        taken = [self._free.pop() for _ in range(n)]
        self._refs[taken] = 1
        return taken

    def _drop(self, pages: list[int]) -> None:
        for page in pages:
            if self._refs[page] <= 0:
                raise JaxkvError(f"page {page} is freed more often than it was referenced")
            self._refs[page] -= 1
            if self._refs[page] == 0:
                self._free.append(page)

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
        self._pages[seq], self._lengths[seq] = list(pages), length

    def release(self, seq) -> None:
        """Give back a finished or preempted sequence's pages (shared ones stay while referenced)."""
        self._drop(self._pages.pop(seq))
        del self._lengths[seq]

    def block_table(self, seqs: list, pages_per_seq: int) -> np.ndarray:
        """int32 [len(seqs), pages_per_seq]: each sequence's pages in order, padded with page 0
        (never read: lengths bound every read)."""
        table = np.zeros((len(seqs), pages_per_seq), np.int32)
        for row, seq in enumerate(seqs):
            pages = self._pages[seq]
            if len(pages) > pages_per_seq:
                raise JaxkvError(f"sequence {seq!r} has {len(pages)} pages, the table holds {pages_per_seq}")
            table[row, :len(pages)] = pages
        return table

    def stats(self) -> PageStats:
        used = self.num_pages - len(self._free)
        tokens = sum(self._lengths.values())
        slots = used * self.page_size  # a shared page counts once, and so do its tokens below
        distinct = {}
        for seq, pages in self._pages.items():
            for i, page in enumerate(pages):
                filled = min(self.page_size, self._lengths[seq] - i * self.page_size)
                distinct[page] = max(distinct.get(page, 0), max(filled, 0))
        return PageStats(total=self.num_pages, used=used, free=len(self._free), tokens=tokens,
                         fragmentation=0.0 if not slots else 1.0 - sum(distinct.values()) / slots)
