"""OpenAI-compatible HTTP server plus a rounds API, over one model (FastAPI + uvicorn).

Endpoints:

- `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (both
  with `stream: true` as server-sent events ending in `data: [DONE]`): openai_api.py.
- `POST /v1/sessions`, `POST /v1/sessions/{id}/rounds`, `GET /v1/sessions/{id}`,
  `DELETE /v1/sessions/{id}`, `POST /v1/snapshots`: rounds_api.py, on the
  `RoundsSession`s of sessions.py.
- `GET /health`, `GET /metrics` (Prometheus text, metrics.py): app.py.

One `Worker` (worker.py, FastAPI-free) owns the engine and every session and runs all
device work on its single thread. Every completion and chat shares the engine's one page
pool (`ServerConfig.reuse`: none, prefix caching, or tokendance: chats waiting together
are prefilled in one collective step, `implicit.py`); completion.py holds one request in
flight. Request bodies and their checks are in schemas.py, the
OpenAI error shape in errors.py, the knobs in config.py (`ServerConfig`), and
`BackgroundServer` (uvicorn on a thread) in testing.py.
"""

from tokendance_jax.serve.app import create_app, serve
from tokendance_jax.serve.config import DEFAULT_MODEL_NAME, ServerConfig
from tokendance_jax.serve.errors import ApiError
from tokendance_jax.serve.sessions import RoundsSession
from tokendance_jax.serve.testing import BackgroundServer
from tokendance_jax.serve.worker import Worker

__all__ = ["DEFAULT_MODEL_NAME", "ApiError", "BackgroundServer", "RoundsSession", "ServerConfig",
           "Worker", "create_app", "serve"]
