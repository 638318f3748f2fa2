"""Measuring what a model computes through the runtime: perplexity under KV compression."""

from jaxkv.eval.perplexity import PerplexityResult, Recorded, perplexity, record

__all__ = ["PerplexityResult", "Recorded", "perplexity", "record"]
