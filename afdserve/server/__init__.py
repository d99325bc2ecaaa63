"""The serving front end: an OpenAI-compatible HTTP API over an engine, Prometheus metrics, and
the `afdserve bench` load generator.

`async_engine` bridges the blocking engine (stepped on one background thread) to asyncio;
`api` is the FastAPI app (wiring, routes, error handlers) over `state` (what the handlers
share), `admission` (requests to engine requests), `streaming` (outputs to one body or SSE) and
`logprobs`; `protocol` the request/response schemas; `metrics` the Prometheus registry; `cli`
the `serve` and `bench` verbs.
"""
