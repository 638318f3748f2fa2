"""The Python API: `llm = jaxkv.load(...)`, `llm.generate(...)`. The CLI only wraps this.

`generate` runs on the serving engine (`jaxkv.serve.engine`): every prompt is added as a request and the
engine steps until all are done, so the Python API, the CLI and the server share one runtime, one check of
a request and one sampling rule (the same seed gives the same text everywhere).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxkv.cache.dense import kv_bytes_per_token
from jaxkv.cache.eviction import Eviction, eviction_policy
from jaxkv.cache.quantize import KIVI, KIVI_PAGE, KIVI_RECENT, KV_DTYPES
from jaxkv.checkpoints.registry import DEFAULT_MODEL, open_source, resolve
from jaxkv.checkpoints.store import assemble_params, load_checkpoint
from jaxkv.config import DTYPES, ModelConfig
from jaxkv.errors import InvalidRequest, JaxkvError
from jaxkv.generate.sampling import SamplingParams
from jaxkv.model.decoder import shard_params
from jaxkv.parallel.mesh import make_mesh
from jaxkv.serve.compiled import Executables, bucket, enable_compilation_cache
from jaxkv.serve.engine import Engine
from jaxkv.serve.requests import Limits, Request, RequestOutput
from jaxkv.serve.speculative import Speculation, speculation
from jaxkv.tokenizer import Tokenizer

DECODE_ITERS = 8  # tokens per row per device call once every prompt is in


@dataclasses.dataclass
class Completion:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) or "length"


@dataclasses.dataclass
class GenerationStats:
    """Timings of the last generate call; run times exclude compilation."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0  # until every prompt had its first token
    decode_s: float = 0.0
    compile_s: float = 0.0
    steps: int = 0  # device calls of the engine
    proposed: int = 0  # speculative decoding: tokens proposed, and kept
    accepted: int = 0
    verified: int = 0  # rows that verified proposals in a step

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_verify(self) -> float:
        """Tokens a verifying row emitted per step: its kept proposals and the token after them."""
        return 1 + self.accepted / self.verified if self.verified else 0.0

    @property
    def tokens_per_s(self) -> float:
        run = self.prefill_s + self.decode_s
        return self.new_tokens / run if run > 0 else 0.0


class LLM:
    """A loaded model: config, tokenizer, params, and generation on an engine sized for the batch."""

    def __init__(self, config: ModelConfig, tokenizer: Tokenizer, params, kv_dtype: str | None = None,
                 page_size: int | None = None, mesh: str | Mesh | None = None, eviction: Eviction | None = None,
                 kv_recent: int | None = None, speculative: Speculation | None = None):
        """kv_dtype: the KV pages' dtype (default the compute dtype; "int8", "fp8", "int4", "kivi2" and "kivi4"
        quantize). page_size: tokens per KV page (default 16; KIVI groups keys by pages of 32). mesh: a Mesh or a
        spec such as "data=2,model=4" (`jaxkv.parallel.make_mesh`):
        parameters, caches and batches are sharded over it by the one rules table; None runs on one device.
        eviction: a KV budget per sequence kept by H2O or SnapKV (`jaxkv.cache.eviction.eviction_policy`).
        kv_recent: KIVI's R, the last tokens of a sequence kept in float (a multiple of the page size; default 128).
        speculative: decoding proposes tokens and verifies them in one step (`jaxkv.serve.speculative.speculation`):
        the same greedy tokens, the same sampling distribution, fewer steps when proposals are kept."""
        self.config = config
        self.tokenizer = tokenizer
        self.mesh = make_mesh(mesh) if isinstance(mesh, str) else mesh
        self.kv_dtype = kv_dtype or config.dtype
        if self.kv_dtype not in KV_DTYPES:
            raise JaxkvError(f"KV dtype must be one of {KV_DTYPES}, got {self.kv_dtype!r}")
        self.eviction = eviction
        self.speculative = speculative
        self.page_size = page_size or (KIVI_PAGE if self.kv_dtype in KIVI else 16)
        if self.page_size & (self.page_size - 1):
            raise JaxkvError(f"page_size must be a power of two, got {self.page_size}")
        kv_recent = KIVI_RECENT if kv_recent is None else kv_recent
        if self.kv_dtype in KIVI and self.page_size != KIVI_PAGE:
            raise JaxkvError(f"KV dtype {self.kv_dtype} groups keys per page of {KIVI_PAGE} tokens: page_size must be "
                             f"{KIVI_PAGE}, got {self.page_size}")
        if self.kv_dtype in KIVI and (kv_recent < 0 or kv_recent % self.page_size):
            raise JaxkvError(f"kv_recent must be a multiple of the page size {self.page_size} (KIVI flushes whole "
                             f"pages), got {kv_recent}")
        self.kv_recent = kv_recent
        self.params = params if self.mesh is None else shard_params(params, config, self.mesh)
        self.executables = Executables(self.mesh)  # shared by the engines generate sizes
        self.stats = GenerationStats()
        self._engine = None

    @property
    def kv_bytes_per_token(self) -> int:
        return kv_bytes_per_token(self.config, self.kv_dtype)

    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        if not isinstance(prompt, str):
            raise InvalidRequest(f"a prompt must be a string, got {type(prompt).__name__}", "prompt")
        if chat:
            return self.tokenizer.encode(self.tokenizer.apply_chat_template(prompt), add_special_tokens=False)
        return self.tokenizer.encode(prompt)

    def generate(self, prompts: str | Sequence[str], max_new_tokens: int = 64, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop: str | Sequence[str] | None = None,
                 chat: bool = False, ignore_eos: bool = False) -> Completion | list[Completion]:
        """Complete one prompt (returns a Completion) or a list (returns a list), batched together. Values out of
        range raise InvalidRequest naming the parameter (as the server's 400s do); ignore_eos generates exactly
        max_new_tokens."""
        single = isinstance(prompts, str)
        out = self._completions(self._text_requests([prompts] if single else list(prompts), max_new_tokens,
                                                     temperature, top_k, top_p, seed, stop, chat, ignore_eos))
        return out[0] if single else out

    def stream(self, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, seed: int = 0, stop: str | Sequence[str] | None = None, chat: bool = False,
               ignore_eos: bool = False) -> Iterator[str]:
        """`generate` for one prompt, yielding its text as the engine emits it (whole characters, a step's tokens
        at a time); the same tokens as `generate`, and `stats` once the iterator is done."""
        requests = self._text_requests([prompt], max_new_tokens, temperature, top_k, top_p, seed, stop, chat,
                                       ignore_eos)
        with contextlib.closing(self._outputs(requests)) as outputs:  # a caller that stops early ends its request
            for out in outputs:
                if out.text:
                    yield out.text

    def generate_ids(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling: SamplingParams,
                     stop: Sequence[str] = (), ignore_eos: bool = False) -> list[Completion]:
        """`generate` from token ids."""
        return self._completions(self._requests(prompts, max_new_tokens, sampling, stop, ignore_eos))

    def _text_requests(self, texts: list[str], max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                       seed: int, stop: str | Sequence[str] | None, chat: bool, ignore_eos: bool) -> list[Request]:
        """The requests of `generate` and `stream`: prompt texts with their sampling values and stop strings."""
        sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        return self._requests([self.encode(t, chat) for t in texts], max_new_tokens, sampling, stops, ignore_eos)

    def _completions(self, requests: list[Request]) -> list[Completion]:
        texts, ids, reasons = {}, {}, {}
        for out in self._outputs(requests):
            texts[out.request_id] = texts.get(out.request_id, "") + out.text
            ids.setdefault(out.request_id, []).extend(out.token_ids)
            if out.finished:
                reasons[out.request_id] = out.finish_reason
        return [Completion(texts[r.request_id], ids[r.request_id], len(r.prompt_ids), reasons[r.request_id])
                for r in requests]

    def _requests(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling: SamplingParams,
                  stop: Sequence[str], ignore_eos: bool) -> list[Request]:
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InvalidRequest(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}", "max_tokens")
        if not prompts:
            raise InvalidRequest("no prompts given", "prompt")
        return [Request(list(p), sampling, max_new_tokens, tuple(stop), ignore_eos=ignore_eos, request_id=str(i))
                for i, p in enumerate(prompts)]

    def _outputs(self, requests: list[Request]) -> Iterator[RequestOutput]:
        """Run `requests` on the engine to the end, yielding every output as its step returns; `stats` at the end.
        A request that ends in error raises its error."""
        engine = self._engine_for(len(requests), max(len(r.prompt_ids) for r in requests),
                                  requests[0].max_tokens)
        for request in requests:  # all or nothing
            engine.check(request)
        compile_before, start, before = self.executables.compile_s, time.perf_counter(), engine.metrics()
        for request in requests:
            engine.add(request)
        started, first_at, new_tokens = set(), None, 0
        try:
            while engine.has_work():
                for out in engine.step():
                    if out.error is not None:
                        raise out.error
                    started.add(out.request_id)
                    new_tokens += len(out.token_ids)
                    yield out
                if first_at is None and len(started) == len(requests):
                    first_at = (time.perf_counter(), self.executables.compile_s)
        finally:  # a caller that stopped early (or an error): the rest leave the engine, ready for the next call
            for request in requests:
                engine.abort(request.request_id)
            while engine.has_work():
                engine.step()
        end, compiled, after = time.perf_counter(), self.executables.compile_s, engine.metrics()
        first_at = first_at or (end, compiled)
        self.stats = GenerationStats(
            prompt_tokens=sum(len(r.prompt_ids) for r in requests), new_tokens=new_tokens,
            compile_s=compiled - compile_before,
            prefill_s=first_at[0] - start - (first_at[1] - compile_before),
            decode_s=end - first_at[0] - (compiled - first_at[1]),
            **{name: after[f"{key}_total"] - before[f"{key}_total"] for name, key in (
                ("steps", "steps"), ("proposed", "speculative_proposed"), ("accepted", "speculative_accepted"),
                ("verified", "speculative_verified_rows"))})

    def _engine_for(self, n_prompts: int, longest: int, max_new_tokens: int):
        """An engine with a row per prompt and pages for the longest prompt plus max_new_tokens (sizes bucketed,
        so calls of similar sizes reuse the engine and its executables)."""
        cfg = self.config
        streaming = cfg.streaming_window is not None
        chunk = bucket(longest, 16)
        context = None if streaming else min(bucket(chunk + max_new_tokens), cfg.max_seq_len)
        if context is not None and longest + max_new_tokens > context:
            context = cfg.max_seq_len  # the engine's check names what is too long
        shape = (bucket(n_prompts), context, chunk)
        engine = self._engine
        if engine is None or not (engine.max_batch >= shape[0] and (streaming or engine.max_context >= shape[1])
                                  and engine.prefill_chunk >= shape[2]):
            self._engine = None  # its pool goes before the next one is made
            engine = self._engine = Engine(
                self, max_batch=shape[0], page_size=self.page_size, kv_dtype=self.kv_dtype, max_context=context,
                prefill_chunk=shape[2], prefill_budget=shape[0] * shape[2], decode_iters=DECODE_ITERS,
                limits=Limits(max_waiting=None, request_timeout_s=None), executables=self.executables,
                eviction=self.eviction, speculative=self.speculative)
        return engine


def load(name_or_path: str = DEFAULT_MODEL, dtype: str | None = None, kv_dtype: str | None = None,
         page_size: int | None = None, streaming_window: int | None = None, sinks: int = 4,
         mesh: str | Mesh | None = None, kv_rotate: bool = False, kv_budget: int | None = None,
         eviction: str | None = None, eviction_window: int | None = None, eviction_sinks: int = 0,
         kv_recent: int | None = None, speculative: str | None = None) -> LLM:
    """Load a preset name (e.g. "smollm2-135m"), a jaxkv checkpoint dir, an HF dir, a GGUF file or a Hugging Face Hub
    id ("org/name" or "org/name@revision": downloaded and converted once, see jaxkv.checkpoints.hub).

    dtype (float32, bfloat16, float16) sets both compute and parameter dtype; by default the checkpoint's own. The
    KV cache lives in pages of page_size tokens (default 16, KIVI 32); kv_dtype "int8", "fp8" (e4m3), "int4",
    "kivi2" or "kivi4" (KIVI, `jaxkv.cache.kivi`) quantizes it. streaming_window turns on StreamingLLM: the cache
    keeps `sinks` first tokens and the last `streaming_window`, so generation runs past the model's context in
    bounded memory. kv_rotate: keys and queries rotated by a Hadamard matrix before the KV is stored (less
    quantization error, same scores). mesh ("data=2,model=4" or a Mesh) shards the model over devices (see `LLM`).
    eviction "h2o" or "snapkv" keeps kv_budget tokens per sequence after its prompt: eviction_window recent ones
    (SnapKV: its observation window), the first eviction_sinks and the most attended others
    (`jaxkv.cache.eviction`). kv_recent: the last tokens KIVI keeps in float (128). speculative "ngram:K": decoding
    proposes up to K tokens by prompt lookup and verifies them in one step (`jaxkv.serve.speculative`); "draft:MODEL:K"
    proposes them with a draft model (any model this function loads, or first-N: this model's first N layers).

    Loading turns on the compilation cache (`jaxkv.serve.compiled.enable_compilation_cache`): what this process
    compiles, the next one loads. JAXKV_COMPILATION_CACHE=0 keeps it off."""
    enable_compilation_cache()
    policy = eviction_policy(eviction, kv_budget, eviction_window, eviction_sinks)  # fails before weights load
    proposer = speculation(speculative)
    if dtype is not None:
        dtype = _dtype_name(dtype)
    mesh = make_mesh(mesh) if isinstance(mesh, str) else mesh  # a bad spec fails before the weights load
    kind, path = resolve(str(name_or_path))
    if kind == "checkpoint":
        cfg, tokenizer, params = load_checkpoint(path)
    else:
        source = open_source(path)
        cfg, tokenizer = source.model_config(), source.tokenizer()
        params = assemble_params(cfg, source, cfg.param_dtype)
    if dtype is not None:
        cfg = cfg.replace(dtype=dtype, param_dtype=dtype)
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype=cfg.param_dtype), params)
    if streaming_window is not None:
        cfg = cfg.replace(streaming_window=streaming_window, streaming_sinks=sinks)
    if kv_rotate:
        cfg = cfg.replace(kv_rotate=True)
    llm = LLM(cfg, tokenizer, params, kv_dtype=kv_dtype, page_size=page_size, mesh=mesh, eviction=policy,
              kv_recent=kv_recent, speculative=proposer)
    if proposer is not None and proposer.method == "draft":
        llm.speculative = dataclasses.replace(proposer, draft=draft_model(proposer.source, llm, dtype))
    return llm


def draft_model(source: str, target: LLM, dtype: str | None = None) -> LLM:
    """A draft for speculative decoding: `first-N`, the target's first N layers with its final norm and head (no
    extra weights), or any model `load` takes, in the target's dtype unless `dtype` is given."""
    cfg = target.config
    if source.startswith("first-"):
        n = source.removeprefix("first-")
        if not n.isdigit() or not 1 <= int(n) < cfg.n_layers:
            raise JaxkvError(f"draft first-N takes N in [1, {cfg.n_layers - 1}] (the target has {cfg.n_layers} "
                             f"layers), got {source!r}")
        n = int(n)
        if any(src >= n for src in cfg.kv_sources[:n]):
            raise JaxkvError(f"draft {source}: a layer below {n} reads KV from a layer at or above it (LCKV); pick "
                             "an N past every layer it reads")
        cut = cfg.replace(n_layers=n, kv_sources=tuple(cfg.kv_sources[:n]),
                          window_layers=tuple(i for i in cfg.window_layers if i < n))
        params = {name: value for name, value in target.params.items()
                  if not name.startswith("layers_") or int(name.split("_")[1]) < n}
        return LLM(cut, target.tokenizer, params, mesh=target.mesh)
    return load(source, dtype=dtype or cfg.dtype, mesh=target.mesh)


def _dtype_name(dtype) -> str:
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        name = None
    if name not in DTYPES:
        raise JaxkvError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return name
