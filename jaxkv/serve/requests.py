"""What a serving request is, what one may cost, and the one check that admits it.

`validate` runs when a request is added, before it can join a batch: it range-checks every field against
the model and the server's `Limits`, so nothing a client sends can raise inside an engine step. Its errors
are `InvalidRequest`s naming the field, which the HTTP server turns into 400s as they are.
"""

from __future__ import annotations

import dataclasses
import numbers
import uuid

import numpy as np

from jaxkv.errors import InvalidRequest, JaxkvError, check_text
from jaxkv.generate.sampling import SamplingParams


@dataclasses.dataclass
class Request:
    prompt_ids: list[int]
    sampling: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    ignore_eos: bool = False  # generate exactly max_tokens (benchmarks)
    request_id: str = dataclasses.field(default_factory=lambda: f"req-{uuid.uuid4().hex[:16]}")
    # Scoring a given text (`jaxkv perplexity`): these tokens are fed instead of sampled ones, one per step as in
    # decoding, and their logprobs reported; max_tokens must equal their number; EOS among them does not stop.
    forced_ids: list[int] | None = None
    distributions: bool = False  # each output also carries the full log-probabilities it chose from
    num_speculative_tokens: int | None = None  # proposals per step, up to the engine's K (None: K; 0: none)


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    text: str  # new text since this request's previous output (whole characters only)
    token_ids: list[int]  # new token ids
    logprobs: list[float] | None  # of each new token, when the request asked
    finished: bool
    finish_reason: str | None  # "stop", "length", "abort" or "error"
    prompt_tokens: int
    completion_tokens: int  # so far
    cached_tokens: int  # prompt tokens taken from the prefix cache
    error: Exception | None = None  # why a request ended with "error" (a failed step, its deadline)
    distributions: np.ndarray | None = None  # [new tokens, vocab] log-probabilities, when the request asked
    kv_bytes: int = 0  # bytes of KV pages (scales included) the request held when this output was made


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may cost the server (`jaxkv serve` options). The engine enforces the stop strings,
    the queue and the deadline; the HTTP layer the body, prompt characters (checked before tokenizing) and
    chat messages. None switches a limit off."""

    max_stop_strings: int = 16  # OpenAI allows 4; matching costs new text x stops per token
    max_stop_chars: int = 512  # per stop string
    max_waiting: int | None = 256  # requests queued for a row; past it, 429 with Retry-After
    request_timeout_s: float | None = 600.0  # from arrival to the last token; then the request is ended
    max_body_bytes: int = 8 * 2**20  # 413 past it
    max_prompt_chars: int | None = None  # default: 32 characters per token the engine takes in a prompt
    max_messages: int = 256  # per chat request

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is not None and not (isinstance(value, numbers.Real) and value > 0):
                raise JaxkvError(f"{field.name} must be positive, got {value!r}")

    def prompt_chars(self, max_prompt_tokens: int) -> int:
        return self.max_prompt_chars or 32 * max_prompt_tokens


def validate(request: Request, *, vocab_size: int, max_prompt: int, max_context: int, limits: Limits,
             max_speculative: int = 0) -> None:
    """Raise InvalidRequest (param as the HTTP API names it; "prompt" for the prompt) unless `request` can be
    served; nothing else can go wrong for it later but the device itself. max_speculative: the engine's K (0: it
    does not speculate)."""
    ids, budget = request.prompt_ids, request.max_tokens
    if not isinstance(request.request_id, str) or not request.request_id:
        raise InvalidRequest(f"request_id must be a non-empty string, got {request.request_id!r}", "request_id")
    if not isinstance(ids, (list, tuple)) or not all(isinstance(t, numbers.Integral) for t in ids):
        raise InvalidRequest("the prompt must be a list of token ids", "prompt")
    if not ids:
        raise InvalidRequest("the prompt is empty (it tokenized to zero tokens)", "prompt")
    if len(ids) > max_prompt:
        raise InvalidRequest(f"the prompt has {len(ids)} tokens; this model's context takes at most {max_prompt}",
                             "prompt", "context_length_exceeded")
    if any(not 0 <= t < vocab_size for t in ids):
        raise InvalidRequest(f"prompt token ids must be in [0, {vocab_size})", "prompt")
    if not isinstance(budget, numbers.Integral) or isinstance(budget, bool) or budget < 1:
        raise InvalidRequest(f"max_tokens must be a positive integer, got {budget!r}", "max_tokens",
                             "integer_below_min_value")
    if len(ids) + budget > max_context:
        raise InvalidRequest(f"this model's context is {max_context} tokens; the prompt has {len(ids)} and "
                             f"max_tokens asks for {budget} more", "max_tokens", "context_length_exceeded")
    sampling = request.sampling
    if not isinstance(sampling, SamplingParams):
        raise InvalidRequest(f"sampling must be a SamplingParams, got {type(sampling).__name__}", "sampling")
    if sampling.top_k > vocab_size:
        raise InvalidRequest(f"top_k must be at most the vocabulary size ({vocab_size}), got {sampling.top_k}",
                             "top_k")
    _validate_stop(request.stop, limits)
    forced = request.forced_ids
    if forced is not None:
        if not isinstance(forced, (list, tuple)) or any(not isinstance(t, numbers.Integral) or not 0 <= t < vocab_size
                                                        for t in forced):
            raise InvalidRequest(f"forced_ids must be a list of token ids in [0, {vocab_size})", "forced_ids")
        if len(forced) != budget:
            raise InvalidRequest(f"max_tokens ({budget}) must equal the number of forced_ids ({len(forced)})",
                                 "max_tokens")
    _validate_speculative(request.num_speculative_tokens, max_speculative)
    for name in ("logprobs", "ignore_eos", "distributions"):
        if not isinstance(getattr(request, name), bool):
            raise InvalidRequest(f"{name} must be true or false", name)


def _validate_stop(stop, limits: Limits) -> None:
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise InvalidRequest("stop must be a string or a list of strings", "stop")
    if len(stop) > limits.max_stop_strings:
        raise InvalidRequest(f"at most {limits.max_stop_strings} stop strings, got {len(stop)}", "stop",
                             "array_above_max_length")
    for s in stop:
        if not s:
            raise InvalidRequest("stop strings must not be empty", "stop")
        if len(s) > limits.max_stop_chars:
            raise InvalidRequest(f"stop strings must be at most {limits.max_stop_chars} characters, got one of "
                                 f"{len(s)}", "stop", "string_above_max_length")
        check_text(s, "stop")


def _validate_speculative(k, max_speculative: int) -> None:
    if k is None:
        return
    if not isinstance(k, numbers.Integral) or isinstance(k, bool) or k < 0:
        raise InvalidRequest(f"num_speculative_tokens must be a non-negative integer, got {k!r}",
                             "num_speculative_tokens")
    if k > max_speculative:
        raise InvalidRequest(f"num_speculative_tokens must be at most {max_speculative}, the server's speculative K, "
                             f"got {k}" if max_speculative else "this server does not speculate (start it with "
                             "--speculative ngram:K): num_speculative_tokens must be 0", "num_speculative_tokens")
