"""The OpenAI-compatible server (being split out of tokendance_jax/server.py)."""
