"""Serving: a continuous-batching engine (`engine`), its asyncio front (`async_engine`) and an
OpenAI-compatible HTTP server (`server`, `jaxkv serve`)."""
