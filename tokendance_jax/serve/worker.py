"""The worker: one asyncio task that owns the engine and every rounds session.

JAX is not thread-safe, so every device call runs in the worker's single executor thread
(`engine.step()` between HTTP events, session rounds between steps). Requests wait in its
bounded queue; past the bound a request gets 429 with `Retry-After`.

Handlers never touch engine, session, registry or allocator state while the worker may be
using it: reads (session info, /metrics) and aborts are closures run on the worker thread
(`Worker.call`, `Worker._abort`); only the worker's own loop touches the engine between its
executor calls, when the executor is idle. FastAPI-free: it speaks in `Completion` events
and `ApiError`s, which the routes turn into HTTP.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import logging
import time
from typing import Any

from tokendance_jax.config import CacheConfig
from tokendance_jax.paging import OutOfPages
from tokendance_jax.rounds import AgentPrompt, ReusePolicy, Round, Segment
from tokendance_jax.sampling import SamplingParams
from tokendance_jax.serve.config import ServerConfig
from tokendance_jax.serve.errors import ApiError, retry_after
from tokendance_jax.serve.metrics import Metrics
from tokendance_jax.serve.sessions import RoundsSession

log = logging.getLogger(__name__)


# -- one completion in flight -------------------------------------------------------


@dataclasses.dataclass
class Completion:
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



# -- the worker: owns the engine and the sessions ----------------------------------------


class Worker:
  """Serializes all device work: engine steps and session calls, on one executor thread."""

  def __init__(self, engine, tokenizer, config: ServerConfig):
    self.engine, self.tok, self.config = engine, tokenizer, config
    self.metrics = Metrics()
    self.sessions: dict[str, RoundsSession] = {}
    self._jobs: collections.deque = collections.deque()
    self._active: list[Completion] = []
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
      elif isinstance(job, Completion):
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
                     headers=retry_after(self.config.retry_after_s))
    self._outstanding += 1

  def submit(self, prompt: list[int], params: SamplingParams, stop: tuple[str, ...]) -> Completion:
    self.ensure_started()
    self._reserve()
    c = Completion(prompt, params, stop, asyncio.Queue())
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

  def cancel(self, c: Completion) -> None:
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

  def _admit(self, c: Completion) -> None:
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

  def _publish(self, c: Completion) -> tuple[str, int] | None:
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
    cut = find_stop(text, c.stop)
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

  async def _abort(self, loop, completions: list[Completion]) -> None:
    """Take the completions' sequences out of the engine and free their pages (`Engine.abort`),
    on the worker thread: the engine's queues and allocator belong to it."""
    ids = [c.seq.seq_id for c in completions if c.seq is not None]
    if ids:
      engine = self.engine
      await loop.run_in_executor(self._executor, lambda: [engine.abort(i) for i in ids])

  def _finish_event(self, c: Completion, reason: str, *, completion_tokens: int = 0,
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


def find_stop(text: str, stops: tuple[str, ...]) -> int | None:
  hits = [i for i in (text.find(s) for s in stops) if i >= 0]
  return min(hits) if hits else None


def _stable_prefix(text: str, stops: tuple[str, ...]) -> str:
  """What may be sent before the end: no trailing partial UTF-8 char, no partial stop string."""
  text = text.rstrip("\ufffd")
  hold = max((len(s) for s in stops), default=1) - 1
  return text[:len(text) - hold] if hold else text
