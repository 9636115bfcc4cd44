"""Streaming: SSE framing and OpenAI chunk building, kept free of I/O so tests need no server."""
