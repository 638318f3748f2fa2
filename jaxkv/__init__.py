"""jaxkv: JAX LLM inference and training where the KV cache is the limit."""

from jaxkv.api import LLM, Completion, load
from jaxkv.cache.dense import KVCache, kv_bytes_per_token
from jaxkv.config import ModelConfig, RopeScaling
from jaxkv.errors import JaxkvError
from jaxkv.generate.sampling import SamplingParams

__all__ = ["LLM", "load", "KVCache", "kv_bytes_per_token", "ModelConfig", "RopeScaling", "JaxkvError",
           "Completion", "SamplingParams"]
