"""KIVI's full-precision residual on the page pool: which of a sequence's tokens are quantized, where the others
live, and which pages a step flushes (quantizes).

KIVI quantizes keys per channel over a group of tokens, so a page can only be quantized once it is full; it also
keeps the most recent tokens in full precision. Here a page is flushed once it is full and outside the `recent`
last tokens: a sequence's first `flushed` tokens (whole pages) live in the quantized pool, the others (at least
`recent`, fewer than recent + page_size) in its ring of `ring_pages(recent, page_size)` float pages, which no
other sequence touches: ring page (row, p) = row x ring_pages + p mod ring_pages for the sequence's page p. The
block table a step's attention reads names the quantized page for columns before flushed // page_size and the
ring page after, so every attention path reads both from one table (`pallas_kernels.paged_attention.reference`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from pallas_kernels.ragged_paged_attention import RaggedMetadata


UNUSED = 2**30  # the quantized page of a flush entry that flushes nothing: past any pool, so its writes drop


def ring_pages(recent: int, page_size: int) -> int:
    """Float pages per sequence: its unflushed tokens span at most recent / page_size + 1 pages."""
    return recent // page_size + 1


def flushed_after(flushed: int, length: int, recent: int, page_size: int) -> int:
    """Tokens of a `length`-token sequence in quantized pages: whole pages, all but at least the `recent` last;
    never fewer than `flushed` before (a cached prefix arrives quantized)."""
    return max(flushed, max(length - recent, 0) // page_size * page_size)


@dataclasses.dataclass(frozen=True)
class Residual:
    """The residual of a KIVI pool: `recent` tokens (a multiple of page_size) stay in float pages."""

    recent: int
    page_size: int

    @property
    def ring(self) -> int:
        return ring_pages(self.recent, self.page_size)

    def plan(self, tables: np.ndarray, sink_rows, cached, n_new, flushed, n_tokens: int):
        """(the block tables the step reads, each row's flushed tokens after it [R], its flushes [F, 4]) for rows
        whose n_new[r] tokens follow cached[r] ones, flushed[r] of them in quantized pages before the step.

        A flush is (row, the sequence's page, its quantized page, its ring page), F = n_tokens // page_size + R
        (the most a step can flush); unused entries name quantized page UNUSED (out of range: dropped).
        tables: int32 [R, W], each row's quantized pages; an active row's (the first len(cached)) columns from its
        new flushed // page_size on become its ring pages."""
        tables = np.array(tables, np.int32)
        n_rows = tables.shape[0]
        after = np.zeros(n_rows, np.int32)
        flushes = np.full((n_tokens // self.page_size + n_rows, 4), UNUSED, np.int32)
        f = 0
        for r, (row, held, n, before) in enumerate(zip(sink_rows, cached, n_new, flushed)):
            after[r] = flushed_after(int(before), int(held + n), self.recent, self.page_size)
            for page in range(int(before) // self.page_size, after[r] // self.page_size):
                flushes[f] = (r, page, tables[r, page], row * self.ring + page % self.ring)
                f += 1
            columns = np.arange(after[r] // self.page_size, tables.shape[1])
            tables[r, columns] = row * self.ring + columns % self.ring
        return tables, after, flushes

    def rewrite(self, src: np.ndarray, dst: np.ndarray, rows, held, flushed, budget: int):
        """Token eviction on a KIVI pool (`jaxkv.cache.eviction.compact`) for the first len(held) of the N rows
        of src, dst [N, W] (the sequences' quantized pages before and after the cut; rows: their places in the
        pool): (where their held tokens are read, where their `budget` kept tokens are written back as one step of
        `budget` new tokens each, that step's flushes). A page's keys share one (scale, minimum) per channel, so
        tokens that move to another page are quantized anew with it."""
        n_rows, n = len(src), len(held)
        read, before, _ = self.plan(src, rows[:n], held, np.zeros(n, np.int32), flushed, 0)
        lengths = np.zeros(n_rows, np.int32)
        lengths[:n] = budget
        tables, after, flushes = self.plan(dst, rows[:n], np.zeros(n, np.int32), lengths[:n], np.zeros(n, np.int32),
                                           n_rows * budget)
        kv_lens = np.zeros(n_rows, np.int32)
        kv_lens[:n] = held
        cu_q_lens = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        return (RaggedMetadata(np.zeros(n_rows + 1, np.int32), kv_lens, read, 1, before),
                RaggedMetadata(cu_q_lens, lengths, tables, budget, after), flushes)
