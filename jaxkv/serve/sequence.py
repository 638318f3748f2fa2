"""A request inside the engine (`jaxkv.serve.engine`): its tokens and how far the cache holds them."""

from __future__ import annotations

from jaxkv.generate.detokenize import TextStream
from jaxkv.serve.requests import Request, RequestOutput
from jaxkv.serve.speculative import Acceptance


class EngineSequence:
    """A request inside the engine: its tokens (prompt, then generated) and how many are in the cache."""

    def __init__(self, request: Request, decode, deadline: float):
        self.request = request
        self.tokens = list(request.prompt_ids)
        self.n_prompt = len(self.tokens)
        self.computed = 0  # tokens whose K/V is in the cache (or was, before eviction dropped it)
        self.dropped = 0  # tokens evicted from the cache
        self.flushed = 0  # KIVI: tokens in quantized pages (the others in its float ring)
        self.prefill_end = 0  # tokens fed as prompt chunks since admission: then decoding starts
        # speculative decoding: the tokens proposed to follow it this step and their source, those its decode row
        # feeds (all of them or none), and how often its proposals were kept
        self.candidate: list[int] = []
        self.source = 0
        self.proposal: list[int] = []
        self.acceptance = Acceptance()
        self.draft_computed = 0  # tokens whose KV a draft model holds (`jaxkv.serve.draft`)
        self.row: int | None = None  # its place among the running requests (where its sink keys live)
        self.order = 0  # admission order: the latest admitted is preempted first
        self.cached_tokens = 0
        self.deadline = deadline  # time.monotonic() by which it must finish
        self.text = TextStream(decode, request.stop)

    @property
    def held(self) -> int:
        """Tokens in the cache: the slots of its pages in use."""
        return self.computed - self.dropped

    def restart(self) -> None:
        """Back to an empty cache (preempted, or its pool lost): recomputed from its tokens when admitted."""
        self.computed = self.dropped = self.flushed = 0
        self.candidate, self.proposal = [], []
        self.draft_computed = 0

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.n_prompt

    @property
    def decoding(self) -> bool:
        """All its tokens but the last sampled one are in the cache: its next step is a decode row."""
        return self.computed == len(self.tokens) - 1 and self.generated > 0

    def output(self, token_ids, logprobs, text: str, reason: str | None, error=None) -> RequestOutput:
        return RequestOutput(self.request.request_id, text, list(token_ids),
                             logprobs if self.request.logprobs else None, reason is not None, reason,
                             self.n_prompt, self.generated, self.cached_tokens, error)
