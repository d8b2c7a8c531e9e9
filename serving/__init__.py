"""Chat history and the local OpenAI-compatible API: what keeps and serves conversations."""
