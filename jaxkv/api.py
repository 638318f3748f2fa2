"""The Python API: `llm = jaxkv.load(...)`, `llm.generate(...)`. The CLI only wraps this."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxkv.cache.dense import kv_bytes_per_token
from jaxkv.checkpoints.registry import DEFAULT_MODEL, open_source, resolve
from jaxkv.checkpoints.store import assemble_params, load_checkpoint
from jaxkv.config import DTYPES, ModelConfig
from jaxkv.errors import JaxkvError
from jaxkv.generate.generator import Completion, Generator
from jaxkv.generate.sampling import SamplingParams
from jaxkv.parallel.mesh import make_mesh
from jaxkv.tokenizer import Tokenizer


class LLM:
    """A loaded model: config, tokenizer, params, and generation with cached compilations."""

    def __init__(self, config: ModelConfig, tokenizer: Tokenizer, params, kv_dtype: str | None = None,
                 page_size: int | None = None, mesh: str | Mesh | None = None):
        """mesh: a Mesh or a spec such as "data=2,model=4" (`jaxkv.parallel.make_mesh`): parameters, caches
        and batches are sharded over it by the one rules table; None runs on one device."""
        self.config = config
        self.tokenizer = tokenizer
        self.mesh = make_mesh(mesh) if isinstance(mesh, str) else mesh
        if (kv_dtype == "int8" or config.streaming_window is not None) and page_size is None:
            page_size = 16  # both live in the paged cache
        self.generator = Generator(config, params, eos_ids=tokenizer.eos_ids, kv_dtype=kv_dtype, page_size=page_size,
                                   mesh=self.mesh)
        self.params = self.generator.params  # placed on the mesh

    @property
    def kv_bytes_per_token(self) -> int:
        return kv_bytes_per_token(self.config, self.generator.kv_dtype)

    @property
    def stats(self):
        """Timings and token count of the last generate call."""
        return self.generator.stats

    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        if not isinstance(prompt, str):
            raise JaxkvError(f"a prompt must be a string, got {type(prompt).__name__}")
        if chat:
            return self.tokenizer.encode(self.tokenizer.apply_chat_template(prompt), add_special_tokens=False)
        return self.tokenizer.encode(prompt)

    def generate(self, prompts: str | Sequence[str], max_new_tokens: int = 64, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop: str | Sequence[str] | None = None,
                 chat: bool = False) -> Completion | list[Completion]:
        """Complete one prompt (returns a Completion) or a list (returns a list), batched together."""
        single = isinstance(prompts, str)
        texts = [prompts] if single else list(prompts)
        sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        stops = [stop] if isinstance(stop, str) else list(stop or ())
        ids = [self.encode(t, chat) for t in texts]
        out = self.generator.generate(ids, max_new_tokens, sampling, stops, decode=self.tokenizer.decode)
        return out[0] if single else out


def load(name_or_path: str = DEFAULT_MODEL, dtype: str | None = None, kv_dtype: str | None = None,
         page_size: int | None = None, streaming_window: int | None = None, sinks: int = 4,
         mesh: str | Mesh | None = None) -> LLM:
    """Load a preset name (e.g. "smollm2-135m"), a jaxkv checkpoint dir, an HF dir or a GGUF file.

    dtype (float32, bfloat16, float16) sets both compute and parameter dtype; by default the
    checkpoint's own. page_size keeps the KV cache in pages of that many tokens; kv_dtype
    "int8" quantizes it (paged, page_size 16 unless given). streaming_window turns on StreamingLLM:
    the cache keeps `sinks` first tokens and the last `streaming_window`, so generation runs past the
    model's context in bounded memory (paged, page_size 16 unless given). mesh ("data=2,model=4" or a
    Mesh) shards the model over devices (see `LLM`).
    """
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
    return LLM(cfg, tokenizer, params, kv_dtype=kv_dtype, page_size=page_size, mesh=mesh)


def _dtype_name(dtype) -> str:
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        name = None
    if name not in DTYPES:
        raise JaxkvError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return name
