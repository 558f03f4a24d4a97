"""OpenAI-compatible HTTP server plus a rounds API, over one model (FastAPI + uvicorn).

Endpoints:

- `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (both
  with `stream: true` as server-sent events ending in `data: [DONE]`), with
  usage counts and `temperature`, `top_p`, `max_tokens`, `stop`, `seed`.
- `POST /v1/sessions`, `POST /v1/sessions/{id}/rounds`, `GET /v1/sessions/{id}`,
  `DELETE /v1/sessions/{id}`: multi-agent rounds on a `RoundSession` (each
  agent's output becomes a shared segment of the other agents' next prompts).
- `POST /v1/snapshots`: save every session with orbax under `state_dir`
  (also done on graceful shutdown; the newest snapshot is restored on start).
- `GET /health`, `GET /metrics` (Prometheus text format).

JAX is not thread-safe, so one `Worker` task owns the engine and every
session: requests wait in its bounded queue and every device call runs in its
single executor thread (`engine.step()` between HTTP events, session rounds
between steps). Past the bound a request gets 429 with `Retry-After`. Bad
input gets a 4xx in the OpenAI error shape and the server keeps serving.

Handlers never touch engine, session, registry or allocator state while the
worker may be using it: reads (session info, /metrics) and aborts are
closures run on the worker thread (`Worker.call`, `Worker._abort`); only the
worker's own loop touches the engine between its executor calls, when the
executor is idle. Chat messages are encoded with the tokenizer's template
markers as control tokens and message text as plain text, so a message
cannot forge a turn.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import re
import secrets
import threading
import time
import uuid
from typing import Any

import pydantic
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tokendance_jax.config import CacheConfig
from tokendance_jax.paging import OutOfPages, pages_needed
from tokendance_jax.roundrun import SYSTEM_CLOSE, SYSTEM_OPEN, TURN_CLOSE
from tokendance_jax.rounds import (PRIVATE_MARK, SHARED_MARK, AgentPrompt, ReusePolicy, Round,
                                   Segment)
from tokendance_jax.sampling import SamplingParams
from tokendance_jax.tokenizer import CHAT_ROLES

log = logging.getLogger("tokendance_jax.server")

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
MAX_STOP_STRINGS = 4


# -- configuration and errors ----------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServerConfig:
  """Knobs of one server (see `serve` for the command-line defaults)."""

  model_name: str = DEFAULT_MODEL_NAME
  api_key: str | None = None
  max_queue: int = 256  # requests waiting beyond the engine's running batch
  session_pages: int = 256  # page pool of each session
  max_sessions: int = 8
  max_agents: int = 32
  default_max_tokens: int = 256  # chat requests without max_tokens
  max_body_bytes: int = 1 << 20
  retry_after_s: int = 1
  state_dir: str | None = None  # session snapshots (orbax): restored on start, saved on shutdown
  snapshot_keep: int = 2
  # Chat requests whose messages mark segments with <|td:shared|> / <|td:private|> run on one
  # long-lived tokendance session: a shared segment seen before is reused, not prefilled.
  chat_reuse_pages: int = 256
  chat_select: str = "block"
  chat_recompute: float = 0.05
  chat_masters: str = "context"  # how masters of marked spans are made (ReusePolicy.masters)

  def __post_init__(self):
    if self.max_queue < 0 or self.session_pages < 2 or self.max_sessions < 0:
      raise ValueError(f"max_queue={self.max_queue} must be >= 0, session_pages="
                       f"{self.session_pages} >= 2, max_sessions={self.max_sessions} >= 0")
    if self.snapshot_keep < 1:
      raise ValueError(f"snapshot_keep={self.snapshot_keep} must be >= 1")
    if self.chat_reuse_pages < 2:
      raise ValueError(f"chat_reuse_pages={self.chat_reuse_pages} must be >= 2")
    ReusePolicy(select=self.chat_select, recompute=self.chat_recompute,
                masters=self.chat_masters)  # checks all three


class ApiError(Exception):
  """An error answered as `{"error": {"message", "type", "param", "code"}}`."""

  def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
               param: str | None = None, code: str | None = None, headers=None):
    super().__init__(message)
    self.status, self.message, self.type = status, message, type
    self.param, self.code, self.headers = param, code, headers or {}

  def response(self) -> JSONResponse:
    body = {"error": {"message": self.message, "type": self.type, "param": self.param,
                      "code": self.code}}
    return JSONResponse(body, status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
  return ApiError(400, message, param=param, code=code)


# -- request bodies --------------------------------------------------------------


class _Body(pydantic.BaseModel):
  """Strict types (no "5" -> 5 coercion); unknown fields are ignored, like OpenAI's."""

  model_config = pydantic.ConfigDict(strict=True, extra="ignore")


class _StreamOptions(_Body):
  include_usage: bool = False


class _Generation(_Body):
  model: str
  max_tokens: int | None = None
  temperature: float | None = None
  top_p: float | None = None
  seed: int | None = None
  stop: str | list[str] | None = None
  stream: bool = False
  stream_options: _StreamOptions | None = None
  n: int = 1


class CompletionRequest(_Generation):
  prompt: str | list[int] | list[str]


class _TextPart(_Body):
  type: str
  text: str = ""


class ChatMessage(_Body):
  role: str
  content: str | list[_TextPart]


class ChatRequest(_Generation):
  messages: list[ChatMessage]
  max_completion_tokens: int | None = None


class SessionRequest(_Body):
  system: str = ""
  agents: dict[str, str]
  method: str = "tokendance"
  select: str = "block"
  recompute: float = 0.05
  check_layer: int = 1
  tau: float | None = None
  masters: str = "context"
  temperature: float = 0.0
  seed: int = 0
  max_tokens: int = 64


class RoundRequest(_Body):
  agents: list[str] | None = None
  max_tokens: int | None = None
  message: str | None = None  # the same instruction for every agent
  messages: dict[str, str] | None = None  # per-agent instructions (override `message`)


def _parse(model_cls, raw: bytes, limit: int):
  """JSON bytes -> a validated body, or ApiError(400/413)."""
  if len(raw) > limit:
    raise ApiError(413, f"request body of {len(raw)} bytes exceeds {limit}", code="too_large")
  try:
    data = json.loads(raw)
  except (ValueError, RecursionError) as e:
    raise bad_request(f"request body is not valid JSON: {e}", code="invalid_json") from None
  try:
    return model_cls.model_validate(data)
  except pydantic.ValidationError as e:
    err = e.errors()[0]
    param = ".".join(str(p) for p in err["loc"]) or None
    raise bad_request(f"invalid field {param or 'body'}: {err['msg']}", param=param,
                      code="invalid_type") from None


# -- one completion in flight -------------------------------------------------------


@dataclasses.dataclass
class _Completion:
  """A request in the engine; the worker pushes ("delta", text) / ("done", info) events."""

  prompt: list[int]
  params: SamplingParams
  stop: tuple[str, ...]
  events: asyncio.Queue
  seq: Any = None
  sent: str = ""
  counted: int = 0  # generated tokens already added to the metrics
  done: bool = False
  cancelled: bool = False


@dataclasses.dataclass
class _Call:
  """A function for the worker thread (session work); its result resolves `future`."""

  fn: Any
  future: asyncio.Future


class Metrics:
  """Counters behind /metrics."""

  def __init__(self):
    self.requests = collections.Counter()  # (endpoint, outcome) -> n
    self.prompt_tokens = 0
    self.generated_tokens = 0
    self.round_seconds_sum = 0.0
    self.rounds = 0
    self.snapshots = 0
    self.last_snapshot_seconds = 0.0
    self._recent: collections.deque[tuple[float, int]] = collections.deque()

  def add_tokens(self, n: int) -> None:
    self.generated_tokens += n
    now = time.monotonic()
    self._recent.append((now, n))
    while self._recent and now - self._recent[0][0] > 10.0:
      self._recent.popleft()

  def tokens_per_second(self) -> float:
    now = time.monotonic()
    recent = [(t, n) for t, n in self._recent if now - t <= 10.0]
    if not recent:
      return 0.0
    return sum(n for _, n in recent) / max(now - recent[0][0], 1.0)


# -- the worker: owns the engine and the sessions ----------------------------------------


class Worker:
  """Serializes all device work: engine steps and session calls, on one executor thread."""

  def __init__(self, engine, tokenizer, config: ServerConfig):
    self.engine, self.tok, self.config = engine, tokenizer, config
    self.metrics = Metrics()
    self.sessions: dict[str, RoundsSession] = {}
    self._jobs: collections.deque = collections.deque()
    self._active: list[_Completion] = []
    self._outstanding = 0  # accepted and unfinished jobs of any kind
    self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="td-engine")
    self._task: asyncio.Task | None = None
    self._wake: asyncio.Event | None = None
    self.last_error: str | None = None
    self._chat_rs = None  # the marked-chat reuse session, made on first use
    self.store = None
    if config.state_dir is not None:
      from tokendance_jax.persist import SnapshotStore

      self.store = SnapshotStore(config.state_dir, keep=config.snapshot_keep)

  # -- lifecycle --

  def ensure_started(self) -> None:
    if self._task is None or self._task.done():
      self._wake = asyncio.Event()
      self._task = asyncio.get_running_loop().create_task(self._loop(), name="td-worker")

  @property
  def alive(self) -> bool:
    return self._task is not None and not self._task.done()

  async def close(self) -> None:
    """Stop the loop, fail what is pending, close every session (pages freed)."""
    loop = asyncio.get_running_loop()
    if self._task is not None:
      self._task.cancel()
      with contextlib.suppress(asyncio.CancelledError, Exception):
        await self._task
    await loop.run_in_executor(self._executor, lambda: None)  # a step in flight ends first
    active = list(self._active)
    try:
      await self._abort(loop, active)
    except Exception:  # noqa: BLE001 - still answer the clients and close the sessions
      log.exception("aborting the active sequences on shutdown failed")
    for c in active:
      self._finish_event(c, "abort", error="server shutting down")
    for job in self._jobs:
      if isinstance(job, _Call) and not job.future.done():
        job.future.set_exception(ApiError(503, "server shutting down", type="server_error"))
      elif isinstance(job, _Completion):
        self._finish_event(job, "abort", error="server shutting down")
    self._jobs.clear()
    for s in list(self.sessions.values()):
      await loop.run_in_executor(self._executor, s.close)
    self.sessions.clear()
    if self._chat_rs is not None:
      await loop.run_in_executor(self._executor, self._chat_rs.close)
    self._executor.shutdown(wait=True)

  # -- admission --

  @property
  def queue_depth(self) -> int:
    """Jobs queued plus sequences waiting in the engine (two len() reads: atomic, no mutation,
    so /health may read it on the event loop while the worker runs)."""
    return len(self._jobs) + self.engine.num_waiting

  def _reserve(self, bounded: bool = True) -> None:
    """Count one more job, or 429 past max_batch running + max_queue waiting."""
    limit = self.engine.max_batch + self.config.max_queue
    if bounded and self._outstanding >= limit:
      self.metrics.requests[("all", "rejected_queue_full")] += 1
      raise ApiError(429, f"server busy: {self._outstanding} requests in flight (limit {limit}); "
                     "retry later", type="rate_limit_exceeded", code="queue_full",
                     headers={"Retry-After": str(self.config.retry_after_s)})
    self._outstanding += 1

  def submit(self, prompt: list[int], params: SamplingParams, stop: tuple[str, ...]) -> _Completion:
    self.ensure_started()
    self._reserve()
    c = _Completion(prompt, params, stop, asyncio.Queue())
    self._jobs.append(c)
    self._wake.set()
    return c

  async def call(self, fn, bounded: bool = True):
    """Run fn() on the worker thread between engine steps; returns its result.

    bounded=False skips the queue bound (for work that frees resources, and
    cheap reads that should answer under load: session info, /metrics).
    """
    self.ensure_started()
    self._reserve(bounded)
    job = _Call(fn, asyncio.get_running_loop().create_future())
    self._jobs.append(job)
    self._wake.set()
    return await job.future

  def cancel(self, c: _Completion) -> None:
    """The client went away: abort at the next chance (pages freed)."""
    if not c.done:
      c.cancelled = True
      self._wake.set()

  # -- the loop --

  async def _loop(self) -> None:
    loop = asyncio.get_running_loop()
    while True:
      if not self._jobs and not self._active:
        self._wake.clear()
        await self._wake.wait()
        continue
      try:
        await self._iteration(loop)
      except asyncio.CancelledError:
        raise
      except Exception as e:  # noqa: BLE001 - a bug must not stop the server
        log.exception("worker iteration failed")
        await self._fail_active(loop, f"{type(e).__name__}: {e}")

  async def _iteration(self, loop) -> None:
    while self._jobs:
      job = self._jobs.popleft()
      if isinstance(job, _Call):
        await self._run_call(loop, job)
      else:
        self._admit(job)
    if self._active:
      await self._step(loop)

  async def _fail_active(self, loop, message: str, status: int = 500) -> None:
    """Abort every active completion and answer it with `status` carrying `message`."""
    self.last_error = message
    active = list(self._active)
    try:
      await self._abort(loop, active)
    except Exception:  # noqa: BLE001 - the engine may be broken; still answer the clients
      log.exception("aborting the active sequences failed")
    for c in active:
      self._finish_event(c, "error", error=message, status=status)

  async def _run_call(self, loop, job: _Call) -> None:
    try:
      result = await loop.run_in_executor(self._executor, job.fn)
    except BaseException as e:  # noqa: BLE001 - forwarded to the waiting handler
      if not job.future.done():
        job.future.set_exception(e)
      if isinstance(e, asyncio.CancelledError):
        raise
    else:
      if not job.future.done():
        job.future.set_result(result)
    finally:
      self._outstanding -= 1

  def _admit(self, c: _Completion) -> None:
    if c.cancelled:
      self._finish_event(c, "abort")
      return
    try:
      seq_id = self.engine.add_request(c.prompt, c.params)
    except ValueError as e:
      self._finish_event(c, "error", error=str(e), status=400)
      return
    c.seq = self.engine.sequence(seq_id)
    self._active.append(c)

  async def _step(self, loop) -> None:
    try:
      await loop.run_in_executor(self._executor, self.engine.step)
    except asyncio.CancelledError:
      raise
    except Exception as e:  # noqa: BLE001 - fail the batch, keep serving
      log.exception("engine step failed")
      await self._fail_active(loop, f"engine step failed: {type(e).__name__}: {e}",
                              503 if isinstance(e, OutOfPages) else 500)  # 503: retry later
      return
    ending = []  # (completion, (reason, completion_tokens)): to abort before answering
    for c in list(self._active):
      end = self._publish(c)
      if end is not None:
        ending.append((c, end))
    if ending:
      await self._abort(loop, [c for c, _ in ending])
      for c, (reason, n) in ending:
        self._finish_event(c, reason, completion_tokens=n)

  # -- per-request output --

  def _publish(self, c: _Completion) -> tuple[str, int] | None:
    """Push the new text of `c`; finish it on EOS, max_tokens, a stop string or a cancel.

    Returns (reason, completion_tokens) when c's sequence must leave the engine
    first (a cancel, or a stop string before the engine finished it): the
    caller aborts it on the worker thread, then finishes c.
    """
    if c.cancelled:
      return "abort", 0
    seq = c.seq
    reason = seq.finish_reason
    ids = list(seq.output)
    self.metrics.add_tokens(len(ids) - c.counted)
    c.counted = len(ids)
    if reason == "stop" and ids and (ids[-1] in seq.params.stop_token_ids
                                     or ids[-1] in self.engine.cfg.eos_ids):
      ids = ids[:-1]
    text = self.tok.decode(ids)
    cut = _find_stop(text, c.stop)
    unfinished = seq.finish_reason is None
    if cut is not None:
      text, reason = text[:cut], "stop"
    if reason is None:
      text = _stable_prefix(text, c.stop)
    if text.startswith(c.sent) and len(text) > len(c.sent):
      c.events.put_nowait(("delta", text[len(c.sent):]))
      c.sent = text
    if reason is not None:
      if unfinished:
        return reason, len(seq.output)
      self.engine.abort(seq.seq_id)  # finished: only leaves the engine's finished table
      self._finish_event(c, reason, completion_tokens=len(seq.output))
    return None

  async def _abort(self, loop, completions: list[_Completion]) -> None:
    """Take the completions' sequences out of the engine and free their pages (`Engine.abort`),
    on the worker thread: the engine's queues and allocator belong to it."""
    ids = [c.seq.seq_id for c in completions if c.seq is not None]
    if ids:
      engine = self.engine
      await loop.run_in_executor(self._executor, lambda: [engine.abort(i) for i in ids])

  def _finish_event(self, c: _Completion, reason: str, *, completion_tokens: int = 0,
                    error: str | None = None, status: int = 500) -> None:
    if c.done:
      return
    c.done = True
    if c in self._active:
      self._active.remove(c)
    self._outstanding -= 1
    info = {"finish_reason": reason, "prompt_tokens": len(c.prompt),
            "completion_tokens": completion_tokens, "error": error, "status": status}
    c.events.put_nowait(("done", info))

  # -- status --

  # -- snapshots (call on the worker thread: `await worker.call(worker.snapshot)`) --

  def session_cache_cfg(self, num_pages: int | None = None) -> CacheConfig:
    c = self.engine.cache_cfg
    return CacheConfig(num_pages=num_pages or self.config.session_pages, page_size=c.page_size,
                       dtype=c.dtype)

  def snapshot(self) -> dict:
    """Save every session (masters, mirrors' pages, tables, histories) as the next step."""
    from tokendance_jax import persist

    if self.store is None:
      raise ApiError(400, "snapshots are off: start the server with --state-dir",
                     code="no_state_dir")
    t0 = time.perf_counter()
    arrays, sessions = {}, {}
    for sid, sess in list(self.sessions.items()):
      arrays[sid], state = persist.capture(sess.rs)
      sessions[sid] = {"session": sess.to_meta(), "state": state}
    meta = {"model": self.config.model_name, "created": time.time(), "sessions": sessions}
    step = self.store.save(arrays, meta)
    seconds = time.perf_counter() - t0
    self.metrics.snapshots += 1
    self.metrics.last_snapshot_seconds = seconds
    log.info("snapshot %d: %d sessions in %.2f s", step, len(sessions), seconds)
    return {"object": "snapshot", "step": step, "sessions": sorted(sessions),
            "path": str(self.store.directory), "seconds": seconds}

  def restore(self) -> int:
    """Load the newest snapshot's sessions (at start, before serving); returns how many."""
    from tokendance_jax import persist

    loaded = self.store.load() if self.store is not None else None
    if loaded is None:
      return 0
    step, arrays, meta = loaded
    if meta["model"] != self.config.model_name:
      raise ValueError(f"snapshot {step} in {self.store.directory} was taken with model "
                       f"{meta['model']!r}, this server serves {self.config.model_name!r}")
    for sid, entry in meta["sessions"].items():
      cache_cfg = self.session_cache_cfg(entry["state"]["pool"]["num_pages"])
      sess = RoundsSession.from_meta(entry["session"], self.engine, self.tok, cache_cfg)
      persist.restore(sess.rs, arrays.get(sid), entry["state"])
      self.sessions[sid] = sess
    log.info("restored %d sessions from snapshot %d", len(meta["sessions"]), step)
    return len(meta["sessions"])

  def chat_round(self, segments: list[Segment], params: SamplingParams):
    """One marked chat request as a one-agent tokendance round (worker thread only).

    Returns (output ids, stats). Masters outlive the request and are evicted
    least recently used when the reuse pool runs short.
    """
    from tokendance_jax.session import RoundSession

    if self._chat_rs is None:
      c, e = self.config, self.engine
      policy = ReusePolicy(select=c.chat_select, recompute=c.chat_recompute,
                           masters=c.chat_masters)
      self._chat_rs = RoundSession(e.params, e.cfg, method="tokendance", policy=policy,
                                   cache_cfg=self.session_cache_cfg(c.chat_reuse_pages),
                                   attn=e.attn, quality=False, keep_masters=True)
    rs = self._chat_rs
    rs.sampling = params
    known = set(rs.masters.masters)
    res = rs.run_round(Round([AgentPrompt("chat", segments, max_tokens=params.max_tokens)]))
    stats = {k: res.stats[k] for k in ("prompt_tokens", "computed_tokens", "pages_copied")}
    stats["shared_tokens_prefilled"] = sum(  # new masters: shared text not seen before
        len(m.tokens) for k, m in rs.masters.masters.items()
        if k not in known and m.source != "decode")
    stats["masters"] = len(rs.masters.masters)
    return res.outputs["chat"], stats

  @property
  def chat_pages_used(self) -> int:
    """Pages of the marked-chat reuse pool in use (worker thread, or once it stopped)."""
    return 0 if self._chat_rs is None else self._chat_rs.allocator.num_used

  def session_pages_used(self) -> int:
    """Pages the sessions' pools hold (worker thread, or once it stopped)."""
    return sum(s.rs.allocator.num_used for s in list(self.sessions.values()))

  def gauges(self) -> dict[str, int]:
    """Engine and session gauges for /metrics; call on the worker thread
    (`await worker.call(worker.gauges)`): they read state that steps and rounds change."""
    e, sessions = self.engine, list(self.sessions.values())  # one atomic copy of the dict
    return {"pages_used": e.allocator.num_used, "pages_free": e.allocator.num_free,
            "session_pages_used": sum(s.rs.allocator.num_used for s in sessions),
            "session_master_pages": sum(s.rs.masters.num_pages for s in sessions),
            "chat_pages_used": self.chat_pages_used, "queue_depth": self.queue_depth,
            "running": len(e.running), "preemptions": e.num_preemptions}


def _find_stop(text: str, stops: tuple[str, ...]) -> int | None:
  hits = [i for i in (text.find(s) for s in stops) if i >= 0]
  return min(hits) if hits else None


def _stable_prefix(text: str, stops: tuple[str, ...]) -> str:
  """What may be sent before the end: no trailing partial UTF-8 char, no partial stop string."""
  text = text.rstrip("\ufffd")
  hold = max((len(s) for s in stops), default=1) - 1
  return text[:len(text) - hold] if hold else text


# -- sessions (the rounds API) ---------------------------------------------------------


class RoundsSession:
  """Agents, their last outputs and a `RoundSession`; every method runs on the worker thread.

  Agent a's prompt in a round: [system turn (shared)] [persona (private)]
  [for each other agent b that spoke last round: header "Agent b said:" (shared),
  b's output token ids (shared; its master made by the session's `masters` policy)]
  [instruction + assistant turn (private)].
  """

  def __init__(self, session_id: str, body: SessionRequest, params, cfg, tok, cache_cfg,
               attn):
    from tokendance_jax.session import RoundSession

    policy = ReusePolicy(select=body.select, recompute=body.recompute,
                         check_layer=body.check_layer, tau=body.tau, masters=body.masters)
    sampling = SamplingParams(max_tokens=1, temperature=body.temperature, seed=body.seed)
    self.id, self.tok, self.cfg, self.body = session_id, tok, cfg, body
    self.method, self.policy = body.method, policy
    self.personas = dict(body.agents)
    self.max_tokens = body.max_tokens
    self.rs = RoundSession(params, cfg, method=body.method, policy=policy, cache_cfg=cache_cfg,
                           attn=attn, sampling=sampling, quality=False)
    system = [(SYSTEM_OPEN, True), (body.system, False), (SYSTEM_CLOSE, True)]
    self.system = Segment(tuple(tok.encode_parts(system)), shared=True, name="system")
    self.last_outputs: dict[str, list[int]] = {}
    self.last_stats: dict | None = None
    self.rounds = 0
    self.closed = False
    self.created = int(time.time())

  def build_round(self, agents: list[str], messages: dict[str, str], max_tokens: int) -> Round:
    prompts = []
    for a in agents:
      segs = [self.system, self._private(f"You are agent {a}. {self.personas[a]}")]
      for b, ids in self.last_outputs.items():
        if b != a and ids:
          header = self.tok.encode_parts([(f"\n\nAgent {b} said:\n", False)])
          segs.append(Segment(tuple(header), shared=True, name=f"header:{b}"))
          segs.append(Segment(tuple(ids), shared=True, name=f"out:{b}"))
      msg = messages.get(a, "")
      segs.append(self._private("\n\n" + msg if msg else "", TURN_CLOSE))
      prompts.append(AgentPrompt(a, segs, max_tokens=max_tokens))
    return Round(prompts)

  def _private(self, text: str, template: str = "") -> Segment:
    """A private segment: user `text` encoded as text, then the `template` markup."""
    return Segment(tuple(self.tok.encode_parts([(text, False), (template, True)])), shared=False)

  def run(self, agents: list[str], messages: dict[str, str], max_tokens: int) -> dict:
    if self.closed:
      raise ApiError(404, f"session {self.id!r} was deleted", code="session_not_found")
    res = self.rs.run_round(self.build_round(agents, messages, max_tokens))
    self.last_outputs = {a: list(ids) for a, ids in res.outputs.items()}
    self.rounds += 1
    self.last_stats = {
        "prefill_seconds": res.prefill_seconds, "round_seconds": res.round_seconds,
        "kv_bytes_per_agent": res.kv_bytes_per_agent,
        "shared_kv_bytes_per_agent": res.shared_kv_bytes_per_agent,
        "pages_in_use": res.pages_in_use,
        "computed_fraction": res.stats.get("computed_fraction"),
        "pages_copied": res.stats.get("pages_copied"),
    }
    return {"session": self.id, "round": res.round,
            "outputs": {a: self.tok.decode(ids) for a, ids in res.outputs.items()},
            "output_tokens": {a: len(ids) for a, ids in res.outputs.items()},
            "stats": self.last_stats}

  def describe(self) -> dict:
    page_bytes = self.rs.page_bytes
    agents = {}
    for a in self.personas:
      ids = self.last_outputs.get(a, [])
      key = Segment(tuple(ids), shared=True).key if ids else None
      pages = len(self.rs.masters.get(key).pages) if key in self.rs.masters else 0
      agents[a] = {"persona": self.personas[a], "last_output_tokens": len(ids),
                   "kv_pages": pages, "kv_bytes": pages * page_bytes}
    alloc = self.rs.allocator
    return {"id": self.id, "object": "session", "created": self.created, "method": self.method,
            "select": self.policy.select, "recompute": self.policy.recompute,
            "rounds": self.rounds, "agents": agents, "pages_in_use": alloc.num_used,
            "pages_total": alloc.num_pages - 1, "master_pages": self.rs.masters.num_pages,
            "bytes_per_page": page_bytes, "last_round": self.last_stats}

  def close(self) -> None:
    self.closed = True
    self.rs.close()
    self.last_outputs = {}

  def to_meta(self) -> dict:
    """JSON-ready history (the KV state is `persist.capture(self.rs)`)."""
    return {"id": self.id, "body": self.body.model_dump(), "last_outputs": self.last_outputs,
            "rounds": self.rounds, "created": self.created, "last_stats": self.last_stats}

  @classmethod
  def from_meta(cls, meta: dict, engine, tok, cache_cfg) -> RoundsSession:
    body = SessionRequest.model_validate(meta["body"])
    sess = cls(meta["id"], body, engine.params, engine.cfg, tok, cache_cfg, engine.attn)
    sess.last_outputs = {a: list(ids) for a, ids in meta["last_outputs"].items()}
    sess.rounds, sess.created, sess.last_stats = meta["rounds"], meta["created"], meta["last_stats"]
    return sess


# -- the app -------------------------------------------------------------------------


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
  _add_openai_routes(router, worker)
  _add_session_routes(router, worker)
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


# -- OpenAI routes --


def _add_openai_routes(router: APIRouter, worker: Worker) -> None:
  cfg = worker.config

  @router.get("/v1/models")
  async def models():
    return {"object": "list", "data": [_model_card(cfg.model_name)]}

  @router.get("/v1/models/{model_id}")
  async def model(model_id: str):
    _check_model(model_id, cfg)
    return _model_card(cfg.model_name)

  @router.post("/v1/completions")
  async def completions(request: Request):
    body = _parse(CompletionRequest, await request.body(), cfg.max_body_bytes)
    prompt = _completion_prompt(body, worker)
    return await _generate(worker, body, prompt, chat=False, default_max=16)

  @router.post("/v1/chat/completions")
  async def chat_completions(request: Request):
    body = _parse(ChatRequest, await request.body(), cfg.max_body_bytes)
    if body.max_completion_tokens is not None and body.max_tokens is None:
      body.max_tokens = body.max_completion_tokens
    segments = _chat_segments(body, worker)
    if segments is not None:
      return await _generate_with_reuse(worker, body, segments)
    prompt = _chat_prompt(body, worker)
    return await _generate(worker, body, prompt, chat=True, default_max=cfg.default_max_tokens)


def _model_card(name: str) -> dict:
  return {"id": name, "object": "model", "created": 0, "owned_by": "tokendance_jax"}


def _check_model(name: str, cfg: ServerConfig) -> None:
  if name != cfg.model_name:
    raise ApiError(404, f"model {name!r} does not exist; this server serves {cfg.model_name!r}",
                   param="model", code="model_not_found")


def _completion_prompt(body: CompletionRequest, worker: Worker) -> list[int]:
  """The prompt's ids. A text prompt is raw text: special-token strings in it (e.g. a
  hand-written "<|im_start|>user") become control ids, as completions clients expect."""
  p = body.prompt
  if isinstance(p, list) and p and isinstance(p[0], str):
    if len(p) != 1:
      raise bad_request("only one prompt per request is supported", param="prompt")
    p = p[0]
  ids = worker.tok.encode(p) if isinstance(p, str) else list(p)
  vocab = worker.engine.cfg.vocab_size
  if any(not 0 <= t < vocab for t in ids):
    raise bad_request(f"prompt token ids must be in [0, {vocab})", param="prompt")
  return ids


def _chat_messages(body: ChatRequest, strip_marks: bool) -> list[dict]:
  """The messages as {role, content} dicts (text parts only), marks stripped or kept."""
  if not body.messages:
    raise bad_request("messages is empty; send at least one message", param="messages")
  msgs = []
  for i, m in enumerate(body.messages):
    if m.role not in CHAT_ROLES:
      raise bad_request(f"messages[{i}].role {m.role!r} is not supported; use one of "
                        f"{', '.join(CHAT_ROLES)}", param=f"messages.{i}.role",
                        code="invalid_value")
    content = m.content if isinstance(m.content, str) else "".join(
        part.text for part in m.content if part.type == "text")
    if strip_marks:
      content = content.replace(SHARED_MARK, "").replace(PRIVATE_MARK, "")
    msgs.append({"role": m.role, "content": content})
  return msgs


def _chat_prompt(body: ChatRequest, worker: Worker) -> list[int]:
  """The chat's ids: template markers as control ids, message text as text."""
  try:
    return worker.tok.encode_parts(worker.tok.chat_parts(_chat_messages(body, True)))
  except ValueError as e:
    raise bad_request(str(e), param="messages") from None


def _chat_segments(body: ChatRequest, worker: Worker) -> list[Segment] | None:
  """Segments of a chat whose messages mark shared text (None when nothing is marked).

  Marks apply across the templated conversation: text after <|td:shared|> is
  shared up to the next mark; the template's own text and everything before
  the first mark are private, and the end of each message closes a shared span.
  """
  msgs = _chat_messages(body, False)
  if not any(SHARED_MARK in m["content"] for m in msgs):
    return None
  for m in msgs:  # a shared span never runs into the template text after its message
    m["content"] = m["content"] + (PRIVATE_MARK if SHARED_MARK in m["content"] else "")
  try:
    return _marked_segments(worker.tok.chat_parts(msgs), worker.tok.encode_parts)
  except ValueError as e:
    raise bad_request(str(e), param="messages") from None


def _marked_segments(parts: list[tuple[str, bool]], encode_parts) -> list[Segment]:
  """Split (text, is_template) chat parts at the marks in their user text into segments.

  Like `rounds.parse_text` on the joined text, but each segment's ids come from
  `encode_parts`, so only template parts can produce control tokens. Marks in
  template text are not marks.
  """
  marks = {SHARED_MARK: True, PRIVATE_MARK: False}
  split = re.compile("(" + "|".join(map(re.escape, marks)) + ")")
  segments, run, shared = [], [], False
  pieces = [(p, template) for text, template in parts
            for p in ([text] if template else split.split(text))]
  for piece, template in [*pieces, (PRIVATE_MARK, False)]:  # the last mark flushes the run
    if not template and piece in marks:
      if run:
        segments.append(Segment(tuple(encode_parts(run)), shared=shared))
      run, shared = [], marks[piece]
    elif piece:
      run.append((piece, template))
  if not segments:
    raise ValueError("text holds no segment")
  return segments


async def _generate_with_reuse(worker: Worker, body: ChatRequest, segments: list[Segment]):
  """A marked chat: one tokendance round on the worker, answered like `_generate`."""
  prompt = [t for s in segments for t in s.tokens]
  params, stop = _sampling(body, len(prompt), worker, worker.config.default_max_tokens)
  cc = worker.session_cache_cfg(worker.config.chat_reuse_pages)
  if pages_needed(len(prompt), cc.page_size) + len(segments) + pages_needed(
      params.max_tokens, cc.page_size) > cc.num_pages - 1:
    raise bad_request(f"prompt + max_tokens needs more than the {cc.num_pages - 1} pages of "
                      "the chat reuse pool", param="max_tokens", code="context_length_exceeded")
  worker.metrics.prompt_tokens += len(prompt)
  try:
    ids, stats = await worker.call(lambda: worker.chat_round(segments, params))
  except OutOfPages as e:
    raise ApiError(503, f"chat reuse pool exhausted ({e}); retry later", type="server_error",
                   code="out_of_pages", headers={"Retry-After": str(worker.config.retry_after_s)}
                   ) from None
  worker.metrics.add_tokens(len(ids))
  text = worker.tok.decode(ids)
  cut = _find_stop(text, stop)
  reason = "stop" if cut is not None or len(ids) < params.max_tokens else "length"
  text = text if cut is None else text[:cut]
  info = {"prompt_tokens": len(prompt), "completion_tokens": len(ids), "finish_reason": reason,
          "error": None, "status": 200}
  meta = {"id": "chatcmpl-" + uuid.uuid4().hex[:24], "created": int(time.time()),
          "model": worker.config.model_name}
  if body.stream:
    c = _Completion(prompt, params, stop, asyncio.Queue(), done=True)
    c.events.put_nowait(("delta", text))
    c.events.put_nowait(("done", info))
    usage = bool(body.stream_options and body.stream_options.include_usage)
    return StreamingResponse(_stream(worker, c, meta, True, usage, "chat"),
                             media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
  worker.metrics.requests[("chat", "ok")] += 1
  return {**_full_response(meta, True, text, info), "tokendance": stats}


def _sampling(body: _Generation, n_prompt: int, worker: Worker, default_max: int):
  """Validate the sampling fields; returns (SamplingParams, stop strings)."""
  _check_model(body.model, worker.config)
  if body.n != 1:
    raise bad_request("only n=1 is supported", param="n")
  if n_prompt == 0:
    raise bad_request("prompt is empty", param="prompt")
  ctx = worker.engine.cfg.max_seq_len
  room = ctx - n_prompt
  if room < 1:
    raise bad_request(f"prompt has {n_prompt} tokens; the model context is {ctx}",
                      param="messages", code="context_length_exceeded")
  max_tokens = body.max_tokens if body.max_tokens is not None else min(default_max, room)
  if max_tokens < 1:
    raise bad_request(f"max_tokens={max_tokens} must be >= 1", param="max_tokens")
  if max_tokens > room:
    raise bad_request(f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) exceeds the "
                      f"model context {ctx}", param="max_tokens",
                      code="context_length_exceeded")
  cc = worker.engine.cache_cfg
  if pages_needed(n_prompt + max_tokens, cc.page_size) > cc.num_pages - 1:
    raise bad_request(f"prompt + max_tokens needs more than the {cc.num_pages - 1} pages of "
                      "the KV pool", param="max_tokens", code="context_length_exceeded")
  temperature = 1.0 if body.temperature is None else body.temperature
  top_p = 1.0 if body.top_p is None else body.top_p
  if not 0.0 <= temperature <= 2.0:
    raise bad_request(f"temperature={temperature} must be in [0, 2]", param="temperature")
  if not 0.0 <= top_p <= 1.0:
    raise bad_request(f"top_p={top_p} must be in [0, 1]", param="top_p")
  if top_p == 0.0:
    temperature, top_p = 0.0, 1.0  # only the most likely token survives
  seed = body.seed if body.seed is not None else secrets.randbits(32)
  if not 0 <= seed < 2**32:
    raise bad_request(f"seed={seed} must be in [0, 2**32)", param="seed")
  stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
  if len(stop) > MAX_STOP_STRINGS or any(not s for s in stop):
    raise bad_request(f"stop takes up to {MAX_STOP_STRINGS} non-empty strings", param="stop")
  params = SamplingParams(max_tokens=max_tokens, temperature=float(temperature),
                          top_p=float(top_p), seed=seed)
  return params, stop


async def _generate(worker: Worker, body: _Generation, prompt: list[int], *, chat: bool,
                    default_max: int):
  params, stop = _sampling(body, len(prompt), worker, default_max)
  endpoint = "chat" if chat else "completions"
  c = worker.submit(prompt, params, stop)
  worker.metrics.prompt_tokens += len(prompt)
  meta = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24],
          "created": int(time.time()), "model": worker.config.model_name}
  if body.stream:
    usage = bool(body.stream_options and body.stream_options.include_usage)
    return StreamingResponse(_stream(worker, c, meta, chat, usage, endpoint),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})
  try:
    text, info = await _collect(c)
  finally:
    worker.cancel(c)
  if info["error"]:
    worker.metrics.requests[(endpoint, "error")] += 1
    busy = {"code": "out_of_pages", "headers": {"Retry-After": str(worker.config.retry_after_s)}}
    raise ApiError(info["status"], info["error"], **(busy if info["status"] == 503 else {}),
                   type="invalid_request_error" if info["status"] < 500 else "server_error")
  worker.metrics.requests[(endpoint, "ok")] += 1
  return _full_response(meta, chat, text, info)


async def _collect(c: _Completion) -> tuple[str, dict]:
  parts = []
  while True:
    kind, value = await c.events.get()
    if kind == "delta":
      parts.append(value)
    else:
      return "".join(parts), value


def _usage(info: dict) -> dict:
  p, n = info["prompt_tokens"], info["completion_tokens"]
  return {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n}


def _full_response(meta: dict, chat: bool, text: str, info: dict) -> dict:
  reason = "length" if info["finish_reason"] == "length" else "stop"
  if chat:
    choice = {"index": 0, "message": {"role": "assistant", "content": text},
              "logprobs": None, "finish_reason": reason}
    obj = "chat.completion"
  else:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
    obj = "text_completion"
  return {**meta, "object": obj, "choices": [choice], "usage": _usage(info)}


def _chunk(meta: dict, chat: bool, text: str | None, reason: str | None, role: bool = False):
  if chat:
    delta = {} if text is None else {"content": text}
    if role:
      delta = {"role": "assistant", "content": ""}
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
    obj = "chat.completion.chunk"
  else:
    choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
    obj = "text_completion"
  return {**meta, "object": obj, "choices": [choice]}


def _sse(payload) -> str:
  return f"data: {json.dumps(payload)}\n\n"


async def _stream(worker: Worker, c: _Completion, meta: dict, chat: bool, usage: bool,
                  endpoint: str):
  try:
    if chat:
      yield _sse(_chunk(meta, chat, None, None, role=True))
    while True:
      kind, value = await c.events.get()
      if kind == "delta":
        yield _sse(_chunk(meta, chat, value, None))
        continue
      if value["error"]:
        worker.metrics.requests[(endpoint, "error")] += 1
        yield _sse({"error": {"message": value["error"], "type": "server_error", "param": None,
                              "code": "out_of_pages" if value["status"] == 503 else None}})
      else:
        worker.metrics.requests[(endpoint, "ok")] += 1
        reason = "length" if value["finish_reason"] == "length" else "stop"
        yield _sse(_chunk(meta, chat, None, reason))
        if usage:
          yield _sse({**meta, "object": _chunk(meta, chat, None, None)["object"], "choices": [],
                      "usage": _usage(value)})
      yield "data: [DONE]\n\n"
      return
  finally:
    worker.cancel(c)


# -- session routes --


def _add_session_routes(router: APIRouter, worker: Worker) -> None:
  cfg = worker.config

  @router.post("/v1/sessions")
  async def create_session(request: Request):
    body = _parse(SessionRequest, await request.body(), cfg.max_body_bytes)
    _check_session_body(body, cfg)
    if len(worker.sessions) >= cfg.max_sessions:
      raise ApiError(429, f"{len(worker.sessions)} sessions open (limit {cfg.max_sessions}); "
                     "delete one first", type="rate_limit_exceeded", code="too_many_sessions",
                     headers={"Retry-After": str(cfg.retry_after_s)})
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
    body = _parse(RoundRequest, await request.body(), cfg.max_body_bytes)
    agents, messages, max_tokens = _round_args(sess, body)
    t0 = time.perf_counter()
    try:
      out = await worker.call(lambda: sess.run(agents, messages, max_tokens))
    except ValueError as e:
      raise bad_request(str(e)) from None
    except OutOfPages as e:
      raise ApiError(503, f"session page pool exhausted ({e}); use fewer agents or tokens",
                     type="server_error", code="out_of_pages") from None
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


def _check_session_body(body: SessionRequest, cfg: ServerConfig) -> None:
  if not body.agents:
    raise bad_request("agents is empty; give at least one {id: persona}", param="agents")
  if len(body.agents) > cfg.max_agents:
    raise bad_request(f"{len(body.agents)} agents; at most {cfg.max_agents}", param="agents")
  if any(not a.strip() or len(a) > 64 for a in body.agents):
    raise bad_request("agent ids must be non-blank and at most 64 characters", param="agents")
  if body.max_tokens < 1:
    raise bad_request(f"max_tokens={body.max_tokens} must be >= 1", param="max_tokens")
  if not 0.0 <= body.temperature <= 2.0:
    raise bad_request(f"temperature={body.temperature} must be in [0, 2]", param="temperature")
  if not 0 <= body.seed < 2**32:
    raise bad_request(f"seed={body.seed} must be in [0, 2**32)", param="seed")


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


# -- health and metrics --


def _add_ops_routes(app: FastAPI, worker: Worker) -> None:
  @app.get("/health")
  async def health():
    worker.ensure_started()
    if not worker.alive:
      raise ApiError(503, "worker is not running", type="server_error")
    return {"status": "ok", "model": worker.config.model_name,
            "queue_depth": worker.queue_depth, "sessions": len(worker.sessions)}

  @app.get("/metrics", response_class=PlainTextResponse)
  async def metrics():
    gauges = await worker.call(worker.gauges, bounded=False)
    return PlainTextResponse(_prometheus(worker, gauges), media_type="text/plain; version=0.0.4")


def _prometheus(worker: Worker, g: dict[str, int]) -> str:
  """The /metrics text from the worker's `gauges()` `g` and the event loop's counters."""
  m = worker.metrics
  rows = [
      ("tokendance_pages_used", "gauge", "engine KV pages in use", g["pages_used"]),
      ("tokendance_pages_free", "gauge", "engine KV pages free", g["pages_free"]),
      ("tokendance_session_pages_used", "gauge", "KV pages held by sessions",
       g["session_pages_used"]),
      ("tokendance_session_master_pages", "gauge", "shared master pages held by sessions",
       g["session_master_pages"]),
      ("tokendance_chat_reuse_pages_used", "gauge", "KV pages of the marked-chat reuse pool",
       g["chat_pages_used"]),
      ("tokendance_queue_depth", "gauge", "requests waiting", g["queue_depth"]),
      ("tokendance_running", "gauge", "sequences decoding", g["running"]),
      ("tokendance_sessions", "gauge", "open sessions", len(worker.sessions)),
      ("tokendance_prompt_tokens_total", "counter", "prompt tokens accepted", m.prompt_tokens),
      ("tokendance_generated_tokens_total", "counter", "tokens generated", m.generated_tokens),
      ("tokendance_tokens_per_second", "gauge", "generation rate over the last 10 s",
       round(m.tokens_per_second(), 3)),
      ("tokendance_preemptions_total", "counter", "engine preemptions", g["preemptions"]),
      ("tokendance_round_seconds_sum", "counter", "session round latency, total",
       round(m.round_seconds_sum, 6)),
      ("tokendance_round_seconds_count", "counter", "session rounds run", m.rounds),
      ("tokendance_snapshots_total", "counter", "session snapshots saved", m.snapshots),
      ("tokendance_snapshot_seconds", "gauge", "duration of the last snapshot",
       round(m.last_snapshot_seconds, 6)),
  ]
  lines = []
  for name, kind, help_text, value in rows:
    lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]
  lines += ["# HELP tokendance_requests_total HTTP generation requests by outcome",
            "# TYPE tokendance_requests_total counter"]
  for (endpoint, outcome), n in sorted(m.requests.items()):
    lines.append(f'tokendance_requests_total{{endpoint="{endpoint}",outcome="{outcome}"}} {n}')
  return "\n".join(lines) + "\n"


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


class BackgroundServer:
  """A uvicorn server for `app` on a thread (tests, notebooks): `with BackgroundServer(app) as s:`."""

  def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
    import socket

    import uvicorn

    if port == 0:
      with socket.socket() as sock:
        sock.bind((host, 0))
        port = sock.getsockname()[1]
    self.host, self.port = host, port
    self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                                lifespan="on"))
    self._thread = threading.Thread(target=self.server.run, name="td-uvicorn", daemon=True)

  @property
  def url(self) -> str:
    return f"http://{self.host}:{self.port}"

  def __enter__(self):
    self._thread.start()
    deadline = time.monotonic() + 30
    while not self.server.started:
      if not self._thread.is_alive() or time.monotonic() > deadline:
        raise RuntimeError(f"uvicorn did not start on {self.url}")
      time.sleep(0.02)
    return self

  def __exit__(self, *exc):
    self.server.should_exit = True
    self._thread.join(timeout=30)
