"""Streaming I/O: one request's run against the engine (session) and the SSE response body
with its nursery (stream). The sans-IO output they send lives in ``output/``."""
