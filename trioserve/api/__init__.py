"""The HTTP edge: request schemas and OpenAI-shaped errors. Nothing here imports MLX."""
