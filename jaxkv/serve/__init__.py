"""Serving: a continuous-batching engine (`engine`) that admits requests through one check (`requests`),
its asyncio front (`async_engine`), and an OpenAI-compatible HTTP server (`server`, `jaxkv serve`) with its
request bodies (`schema`), guard (`guard`: Host, API key, body size, idle connections) and `metrics`."""
