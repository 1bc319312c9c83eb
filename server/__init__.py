"""The chat server: an OpenAI-compatible API and a web chat for any stage (scripts/serve.py)."""
