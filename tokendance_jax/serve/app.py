"""The app: `create_app` wires the worker, the OpenAI and rounds routes, `GET /health`,
`GET /metrics` (Prometheus text), bearer-token auth and the error handlers; `serve` loads the
real model and runs it under uvicorn.

With `state_dir` set, the newest session snapshot is restored on start and every session is
saved on graceful shutdown. Bad input gets a 4xx in the OpenAI error shape, an unexpected
error a 500 in the same shape, and the server keeps serving.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import secrets

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tokendance_jax.serve.config import ServerConfig
from tokendance_jax.serve.errors import ApiError
from tokendance_jax.serve.metrics import CONTENT_TYPE_LATEST, MetricsExporter
from tokendance_jax.serve.openai_api import add_openai_routes
from tokendance_jax.serve.rounds_api import add_session_routes
from tokendance_jax.serve.worker import Worker

log = logging.getLogger(__name__)


def create_app(engine, tokenizer, *, config: ServerConfig | None = None, **overrides) -> FastAPI:
  """A FastAPI app serving `engine` (an `Engine`) with `tokenizer`.

  `tokenizer` needs `encode(text) -> ids` (raw prompts: special-token strings
  become control ids), `decode(ids) -> text`, `chat_parts(messages) -> [(text,
  is_template)]` and `encode_parts(parts) -> ids` (control ids only from the
  template parts), like `tokenizer.Tokenizer`. Keyword overrides replace fields of
  `config` (e.g. `api_key="..."`, `max_queue=4`). The worker is at
  `app.state.worker`.
  """
  config = dataclasses.replace(config or ServerConfig(), **overrides)
  worker = Worker(engine, tokenizer, config)

  @contextlib.asynccontextmanager
  async def lifespan(app):
    worker.ensure_started()
    if worker.store is not None:
      await worker.call(worker.restore, bounded=False)  # a bad snapshot stops the start
    yield
    if worker.store is not None:
      try:
        await worker.call(worker.snapshot, bounded=False)
      except Exception:  # noqa: BLE001 - still close; the previous snapshot stays loadable
        log.exception("snapshot on shutdown failed")
    await worker.close()

  app = FastAPI(title="tokendance_jax", lifespan=lifespan)
  app.state.worker = worker
  _install_error_handlers(app)
  router = APIRouter(dependencies=[Depends(_auth_dependency(config.api_key))])
  add_openai_routes(router, worker)
  add_session_routes(router, worker)
  app.include_router(router)
  _add_ops_routes(app, worker)
  return app


def _install_error_handlers(app: FastAPI) -> None:
  @app.exception_handler(ApiError)
  async def api_error(request, exc: ApiError):
    return exc.response()

  @app.exception_handler(StarletteHTTPException)
  async def http_error(request, exc: StarletteHTTPException):
    code = "not_found" if exc.status_code == 404 else None
    return ApiError(exc.status_code, str(exc.detail), code=code).response()

  app.add_middleware(_answer_unexpected)


def _answer_unexpected(app):
  """ASGI middleware: an unexpected error is answered with a 500 in the OpenAI shape here
  (Starlette's handler for Exception answers, then re-raises to uvicorn, which closes the
  client's keep-alive connection: its next request would fail)."""

  async def middleware(scope, receive, send):
    started = set()

    async def watch(message):
      started.add(message["type"])
      await send(message)

    try:
      await app(scope, receive, watch)
    except Exception as exc:  # noqa: BLE001 - answered; mid-response, the server must close
      if started or scope["type"] != "http":
        raise
      log.exception("unhandled error")
      await ApiError(500, f"internal error: {type(exc).__name__}: {exc}",
                     type="server_error").response()(scope, receive, send)
  return middleware


def _auth_dependency(api_key: str | None):
  async def check(request: Request):
    if api_key is None:
      return
    got = request.headers.get("authorization", "")
    scheme, _, token = got.partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), api_key):
      raise ApiError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                     code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
  return check



# -- health and metrics --


def _add_ops_routes(app: FastAPI, worker: Worker) -> None:
  @app.get("/health")
  async def health():
    worker.ensure_started()
    if not worker.alive:
      raise ApiError(503, "worker is not running", type="server_error")
    return {"status": "ok", "model": worker.config.model_name,
            "queue_depth": worker.queue_depth, "sessions": len(worker.sessions)}

  exporter = MetricsExporter(worker.metrics)  # one registry per app, never the global one

  def read_gauges() -> dict[str, int]:
    return {"sessions": len(worker.sessions), **worker.gauges()}

  @app.get("/metrics", response_class=PlainTextResponse)
  async def metrics():
    gauges = await worker.call(read_gauges, bounded=False)  # on the worker thread
    return PlainTextResponse(exporter.render(gauges), media_type=CONTENT_TYPE_LATEST)


# -- running it --------------------------------------------------------------------------


def serve(host: str = "127.0.0.1", port: int = 8000, *, engine=None, tokenizer=None,
          dtype: str | None = None, cache_dir=None, num_pages: int = 1024, page_size: int = 16,
          max_batch: int = 32, force_kernel: bool = False, log_level: str = "info",
          **config) -> None:
  """Load the real model (unless `engine` and `tokenizer` are given) and serve until stopped.

  Extra keywords are `ServerConfig` fields (api_key, max_queue, session_pages,
  max_sessions, model_name, ...).
  """
  import uvicorn

  if engine is None:
    from tokendance_jax import api

    engine, tokenizer = api.load_engine(dtype=dtype, cache_dir=cache_dir,
                                        force_kernel=force_kernel, num_pages=num_pages,
                                        page_size=page_size, max_batch=max_batch)
  elif tokenizer is None:
    raise ValueError("serve(engine=...) needs its tokenizer too")
  app = create_app(engine, tokenizer, config=ServerConfig(**config))
  uvicorn.run(app, host=host, port=port, log_level=log_level)
