"""OpenAI's response shapes for a request in flight: server-sent events, logprobs and usage."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

from jaxkv.serve.async_engine import RequestStream
from jaxkv.serve.schema import api_error


def sse(payload: dict | str, ascii_only: bool = False) -> str:
    """One event; ascii_only for errors, whose message may quote a client's text (lone surrogates included)."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=ascii_only,
                                                               separators=(",", ":"))
    return f"data: {data}\n\n"


class Generation:
    """One request's bookkeeping while it streams or is collected."""

    def __init__(self, tokenizer, eos_ids, request_id: str, logprobs: bool):
        self.tokenizer, self.eos_ids, self.request_id, self.want_logprobs = tokenizer, eos_ids, request_id, logprobs
        self.created = int(time.time())
        self.text = ""
        self.ids: list[int] = []  # generated ids with logprobs reported (EOS left out)
        self.logprobs: list[float] = []
        self.finish_reason: str | None = None
        self.usage: dict | None = None

    def add(self, out) -> tuple[list[int], list[float]]:
        """Record an output; return the ids and logprobs it adds to the reported tokens."""
        ids, lps = list(out.token_ids), list(out.logprobs or [0.0] * len(out.token_ids))
        if out.finished and out.finish_reason == "stop" and ids and ids[-1] in self.eos_ids:
            ids, lps = ids[:-1], lps[:-1]  # the end-of-text token is not part of the text
        self.text += out.text
        self.ids += ids
        self.logprobs += lps
        if out.finished:
            self.finish_reason = out.finish_reason
        self.usage = {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
                      "total_tokens": out.prompt_tokens + out.completion_tokens,
                      "prompt_tokens_details": {"cached_tokens": out.cached_tokens}}
        return ids, lps

    def completion_logprobs(self, ids: list[int], lps: list[float]) -> dict:
        """OpenAI's completions logprobs for `ids`, the last len(ids) of self.ids."""
        start = len(self.ids) - len(ids)
        decode = self.tokenizer.decode
        offsets = [min(len(decode(self.ids[:i])), len(self.text)) for i in range(start, len(self.ids))]
        return {"tokens": [self.tokenizer.token_text(i) for i in ids], "token_logprobs": lps,
                "top_logprobs": None, "text_offset": offsets}

    def chat_logprobs(self, ids: list[int], lps: list[float]) -> dict:
        tok = self.tokenizer
        return {"content": [{"token": tok.token_text(i), "logprob": lp, "bytes": list(tok.token_bytes(i)),
                             "top_logprobs": []}
                            for i, lp in zip(ids, lps)]}


async def events(model_name: str, stream: RequestStream, gen: Generation, include_usage: bool, kind: str,
                  choices_of, opening: tuple = ()) -> AsyncIterator[str]:
    """Server-sent events for both endpoints: `opening` chunks, then `choices_of(out, ids, logprobs)`'s chunks per
    engine output, the usage chunk when asked, errors in-band once the stream has begun, and [DONE]."""
    def chunk(choices: list, usage=None) -> str:
        out = {"id": gen.request_id, "object": kind, "created": gen.created, "model": model_name,
               "system_fingerprint": None, "choices": choices}
        if include_usage:
            out["usage"] = usage
        return sse(out)

    try:
        for choices in opening:
            yield chunk(choices)
        async for out in stream:
            ids, lps = gen.add(out)
            for choices in choices_of(out, ids, lps):
                yield chunk(choices)
        if include_usage:
            yield chunk([], gen.usage)
    except Exception as e:  # noqa: BLE001 - the stream has begun: report in-band
        yield sse(api_error(e).body(), ascii_only=True)
    finally:
        stream.abort()
    yield sse("[DONE]")


def completion_events(model_name: str, stream: RequestStream, gen: Generation,
                       include_usage: bool) -> AsyncIterator[str]:
    def choices_of(out, ids, lps):
        if out.text or out.finished or (gen.want_logprobs and ids):
            lp = gen.completion_logprobs(ids, lps) if gen.want_logprobs else None
            yield [{"index": 0, "text": out.text, "logprobs": lp,
                    "finish_reason": out.finish_reason if out.finished else None}]

    return events(model_name, stream, gen, include_usage, "text_completion", choices_of)


def chat_events(model_name: str, stream: RequestStream, gen: Generation,
                 include_usage: bool) -> AsyncIterator[str]:
    def choices_of(out, ids, lps):
        if out.text or (gen.want_logprobs and ids):
            lp = gen.chat_logprobs(ids, lps) if gen.want_logprobs else None
            yield [{"index": 0, "delta": {"content": out.text}, "logprobs": lp, "finish_reason": None}]
        if out.finished:
            yield [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": out.finish_reason}]

    opening = ([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}],)
    return events(model_name, stream, gen, include_usage, "chat.completion.chunk", choices_of, opening)
