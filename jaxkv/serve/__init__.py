"""The one inference runtime and its HTTP face. `engine`: continuous batching, one ragged device call per step
(`step`), shapes compiled ahead (`compiled`), every request admitted through one check (`requests`). Behind
`LLM.generate`, the CLI and `async_engine` (its asyncio front), which the OpenAI-compatible server (`server`,
`jaxkv serve`) drives, with its request bodies and error mapping (`schema`), streamed events and logprobs
(`events`), guard (`guard`: Host, API key, body size, idle connections) and `metrics`."""
