"""Measuring what a model computes through the runtime: perplexity under KV compression."""

from jaxkv.eval.perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "perplexity"]
