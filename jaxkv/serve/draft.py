"""The draft-model proposer of speculative decoding: a smaller jaxkv model proposes k tokens, greedily.

The draft keeps its own KV pool, but at the page ids of the target's (one group of full tables): each sequence's
draft KV sits in the pages the engine's allocator gave it, so the draft needs no allocator of its own, is released,
preempted and truncated with the target, and a rejected proposal's draft KV, past the sequence's length, is simply
never read again. A sequence's draft KV holds its first `draft_computed` tokens; proposing first feeds it the ones it
missed (its prompt, the tokens of steps that did not speculate) in chunks, then runs k + 1 decode iterations in one
call from the sequence's last token: they feed the last token and the k proposals, so that once the target keeps m
of them the draft holds exactly the target's m + 1 new tokens.
"""

from __future__ import annotations

import numpy as np

from jaxkv.cache.paged import PagePool, StepMetadata
from jaxkv.errors import JaxkvError
from jaxkv.serve.compiled import Executables
from jaxkv.serve.step import ragged_step

PROBE = "The draft and the target must agree: 12345, naïve café, 日本語, <|im_start|> {\"key\": [1, 2]}\n\tdone."


class Draft:
    """A draft model's pool beside an engine's, and its proposals for the engine's decode rows."""

    def __init__(self, llm, target, *, num_pages: int, page_size: int, max_batch: int, max_context: int,
                 prefill_chunk: int, k: int, executables: Executables):
        """llm: the draft (a `jaxkv.api.LLM`); target: the engine's LLM. One clear error if the draft cannot serve
        the target: another vocabulary or tokenizer, a context shorter than the engine's, or a model whose KV the
        paged cache cannot hold for it (StreamingLLM)."""
        cfg = llm.config
        if cfg.vocab_size != target.config.vocab_size:
            raise JaxkvError(f"the draft model's vocabulary has {cfg.vocab_size} tokens, the target's "
                             f"{target.config.vocab_size}: a draft must share the target's tokenizer")
        if llm.tokenizer.hf.get_vocab() != target.tokenizer.hf.get_vocab() or \
                llm.tokenizer.encode(PROBE) != target.tokenizer.encode(PROBE):
            raise JaxkvError("the draft model's tokenizer differs from the target's: a draft must share the "
                             "target's tokenizer")
        if cfg.max_seq_len < max_context:
            raise JaxkvError(f"the draft model's context is {cfg.max_seq_len} tokens, shorter than the {max_context} "
                             "this engine serves: use a draft with a longer context, or a smaller max_context")
        if cfg.streaming_window is not None:
            raise JaxkvError("a draft model cannot use StreamingLLM")
        self.cfg, self.params, self.k = cfg, llm.params, k
        self.prefill_chunk, self.max_batch = prefill_chunk, max_batch
        self.executables, self.mesh = executables, llm.mesh
        self.groups = (tuple(range(cfg.n_kv_layers)),)
        self._init = lambda: (PagePool.init(cfg, num_pages, page_size, max_batch, cfg.dtype),)
        self.pools = self._init()

    def reset(self) -> None:
        """A fresh pool (the engine's was lost): every sequence's draft KV starts again."""
        self.pools = self._init()

    def propose(self, rows, tables: np.ndarray, scratch: int, catch_up_tokens: list[int],
                decode_rows: int) -> list[list[int]]:
        """Proposals for rows (sequence, k <= self.k) whose pages hold their tokens plus k + 1: tables [rows, W]
        their page ids, `scratch` past them. Feeds each row the tokens its draft KV misses but the last, in chunks
        (token buckets catch_up_tokens), then k + 1 greedy decode iterations on decode_rows rows."""
        while True:
            budget, lag = catch_up_tokens[-1], []
            for seq, _ in rows:
                lag.append(min(len(seq.tokens) - 1 - seq.draft_computed, self.prefill_chunk, budget))
                budget -= lag[-1]
            if not any(lag):
                break
            n_tokens = min(t for t in catch_up_tokens if t >= sum(lag))
            self._run([s for s, _ in rows], lag, tables, scratch, n_tokens, self.max_batch, 1)
        sampled = self._run([s for s, _ in rows], [1] * len(rows), tables, scratch, decode_rows, decode_rows,
                            self.k + 1)
        return [[int(t) for t in sampled[:k, r]] for r, (_, k) in enumerate(rows)]

    def _run(self, seqs, n_new: list[int], tables: np.ndarray, scratch: int, n_tokens: int, n_rows: int,
             iters: int) -> np.ndarray:
        """One call feeding each sequence n_new of its tokens from draft_computed (iters > 1: decode rows, each
        sampled token fed back); returns the greedy tokens [iters, n_rows]."""
        table = np.full((n_rows, tables.shape[1]), scratch, np.int32)
        table[:len(seqs)] = tables[:len(seqs)]
        tokens = np.zeros(n_tokens, np.int32)
        at = 0
        for seq, n in zip(seqs, n_new):
            tokens[at:at + n] = seq.tokens[seq.draft_computed:seq.draft_computed + n]
            at += n
        held = [s.draft_computed for s in seqs]
        meta = StepMetadata.pack([table], held, n_new, n_tokens=n_tokens,
                                 max_q_len=1 if iters > 1 else self.prefill_chunk)
        passes = min(max(n_new), self.cfg.upward_passes_no_grad + self.cfg.upward_passes_grad)  # LCKV
        sampled, _, _, self.pools = self.executables.run(
            ragged_step, (1,), self.params, self.pools, tokens, meta, *greedy(n_rows, iters), np.int32(passes),
            cfg=self.cfg, groups=self.groups, iters=iters, distributions=False, mesh=self.mesh)
        for seq, n in zip(seqs, n_new):
            seq.draft_computed += n + iters - 1
        return np.asarray(sampled)

    def warmup(self, decode_rows: list[int], catch_up_tokens: list[int], widths: list[int], scratch: int) -> None:
        """Compile every shape `propose` uses, writing nothing (idle rows)."""
        shapes = [(r, r, self.k + 1) for r in decode_rows] + [(t, self.max_batch, 1) for t in catch_up_tokens]
        for (n_tokens, n_rows, iters), width in ((s, w) for s in shapes for w in widths):
            table = np.full((n_rows, width), scratch, np.int32)
            meta = StepMetadata.pack([table], [], [], n_tokens=n_tokens, max_q_len=1 if iters > 1 else
                                     self.prefill_chunk)
            _, _, _, self.pools = self.executables.run(
                ragged_step, (1,), self.params, self.pools, np.zeros(n_tokens, np.int32), meta,
                *greedy(n_rows, iters), np.int32(1), cfg=self.cfg, groups=self.groups, iters=iters,
                distributions=False, mesh=self.mesh)


def greedy(n_rows: int, iters: int) -> tuple:
    """The sampling arrays of greedy rows, none forced: (seeds, steps, temperature, top_k, top_p, forced)."""
    return (np.zeros(n_rows, np.uint32), np.zeros(n_rows, np.int32), np.zeros(n_rows, np.float32),
            np.zeros(n_rows, np.int32), np.ones(n_rows, np.float32), np.full((iters, n_rows), -1, np.int32))

