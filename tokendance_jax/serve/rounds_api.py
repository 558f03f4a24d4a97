"""The rounds API: multi-agent rounds on `RoundsSession`s, each agent's output a shared
segment of the other agents' next prompts (serve/sessions.py lays the prompts out).

`POST /v1/sessions`, `GET /v1/sessions`, `GET /v1/sessions/{id}`,
`POST /v1/sessions/{id}/rounds`, `DELETE /v1/sessions/{id}`, and `POST /v1/snapshots` (save
every session with orbax under `state_dir`). Every session call runs on the worker thread.
"""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request

from tokendance_jax.paging import OutOfPages
from tokendance_jax.serve.errors import ApiError, bad_request, out_of_pages, retry_after
from tokendance_jax.serve.schemas import (
  RoundRequest,
  SessionRequest,
  check_session_body,
  parse_body,
)
from tokendance_jax.serve.sessions import RoundsSession
from tokendance_jax.serve.worker import Worker


def add_session_routes(router: APIRouter, worker: Worker) -> None:
  """The /v1/sessions and /v1/snapshots routes on `router`."""
  cfg = worker.config

  @router.post("/v1/sessions")
  async def create_session(request: Request):
    body = parse_body(SessionRequest, await request.body(), cfg.max_body_bytes)
    check_session_body(body, cfg)
    if len(worker.sessions) >= cfg.max_sessions:
      raise ApiError(429, f"{len(worker.sessions)} sessions open (limit {cfg.max_sessions}); "
                     "delete one first", type="rate_limit_exceeded", code="too_many_sessions",
                     headers=retry_after(cfg.retry_after_s))
    sid = "sess-" + uuid.uuid4().hex[:16]
    engine, cache_cfg = worker.engine, worker.session_cache_cfg()

    def make():
      sess = RoundsSession(sid, body, engine.params, engine.cfg, worker.tok, cache_cfg,
                           engine.attn)
      return sess, sess.describe()

    try:
      sess, info = await worker.call(make)
    except ValueError as e:
      raise bad_request(str(e)) from None
    worker.sessions[sid] = sess
    return info

  @router.get("/v1/sessions")
  async def list_sessions():
    sessions = list(worker.sessions.values())
    infos = await worker.call(lambda: [s.describe() for s in sessions], bounded=False)
    return {"object": "list", "data": infos}

  @router.get("/v1/sessions/{sid}")
  async def get_session(sid: str):
    return await worker.call(_session(worker, sid).describe, bounded=False)

  @router.post("/v1/sessions/{sid}/rounds")
  async def run_round(sid: str, request: Request):
    sess = _session(worker, sid)
    body = parse_body(RoundRequest, await request.body(), cfg.max_body_bytes)
    agents, messages, max_tokens = _round_args(sess, body)
    t0 = time.perf_counter()
    try:
      out = await worker.call(lambda: sess.run(agents, messages, max_tokens))
    except ValueError as e:
      raise bad_request(str(e)) from None
    except OutOfPages as e:
      message = f"session page pool exhausted ({e}); use fewer agents or tokens"
      raise out_of_pages(message) from None
    worker.metrics.rounds += 1
    worker.metrics.round_seconds_sum += time.perf_counter() - t0
    worker.metrics.add_tokens(sum(out["output_tokens"].values()))
    return out

  @router.post("/v1/snapshots")
  async def snapshot():
    return await worker.call(worker.snapshot, bounded=False)

  @router.delete("/v1/sessions/{sid}")
  async def delete_session(sid: str):
    sess = _session(worker, sid)
    worker.sessions.pop(sid, None)
    await worker.call(sess.close, bounded=False)
    return {"id": sid, "object": "session.deleted", "deleted": True}


def _session(worker: Worker, sid: str) -> RoundsSession:
  if sid not in worker.sessions:
    raise ApiError(404, f"session {sid!r} does not exist", param="session_id",
                   code="session_not_found")
  return worker.sessions[sid]


def _round_args(sess: RoundsSession, body: RoundRequest):
  agents = list(sess.personas) if body.agents is None else body.agents
  if not agents:
    raise bad_request("agents is empty", param="agents")
  if len(set(agents)) != len(agents):
    raise bad_request("agents lists an agent twice", param="agents")
  messages = {a: body.message for a in agents} if body.message else {}
  messages.update(body.messages or {})
  unknown = [a for a in [*agents, *messages] if a not in sess.personas]
  if unknown:
    raise ApiError(404, f"agent {unknown[0]!r} is not in session {sess.id!r}", param="agents",
                   code="agent_not_found")
  max_tokens = sess.max_tokens if body.max_tokens is None else body.max_tokens
  if max_tokens < 1:
    raise bad_request(f"max_tokens={max_tokens} must be >= 1", param="max_tokens")
  return agents, messages, max_tokens
