"""The engine: one MLX worker thread with continuous batching, driven from Trio."""
