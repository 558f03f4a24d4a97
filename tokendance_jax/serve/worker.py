"""The worker: one asyncio task that owns the engine and every rounds session.

Every completion runs on the engine's one page pool and scheduler. With reuse
"prefix" or "tokendance" the engine caches prefixes; with "tokendance", chat
requests (`Completion.request`) first wait for others (until none has arrived for
`gather_ms`, at most 10 x `gather_ms` after the first), then all
those waiting go through one collective prefill step (`implicit.ImplicitRounds`)
and are adopted by the engine, decoded and streamed like any other request.

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
from tokendance_jax.engine import CacheLost
from tokendance_jax.implicit import ImplicitRounds, Request, message_openers
from tokendance_jax.paging import OutOfPages
from tokendance_jax.sampling import SamplingParams
from tokendance_jax.serve.completion import Completion, find_stop, stable_prefix
from tokendance_jax.serve.config import ServerConfig
from tokendance_jax.serve.errors import ApiError, retry_after
from tokendance_jax.serve.metrics import Metrics
from tokendance_jax.serve.sessions import RoundsSession

log = logging.getLogger(__name__)


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
    self.openers = message_openers(tokenizer)  # where a chat's messages begin (chunk cuts)
    self.metrics = Metrics()
    self.sessions: dict[str, RoundsSession] = {}
    self._jobs: collections.deque = collections.deque()
    self._active: list[Completion] = []
    self._outstanding = 0  # accepted and unfinished jobs of any kind
    self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="td-engine")
    self._task: asyncio.Task | None = None
    self._wake: asyncio.Event | None = None
    self.last_error: str | None = None
    if config.reuse == "none" and engine.prefix is not None:
      raise ValueError("reuse='none' needs an engine without prefix caching")
    if config.reuse != "none":
      engine.enable_prefix_caching()
    self.implicit = (ImplicitRounds(engine, config.reuse_policy(), config.chunk_config(),
                                    config.chat_private_tail)
                     if config.reuse == "tokendance" else None)
    self._gather: list[Completion] = []  # chats waiting for the next collective step
    self._gather_since = self._gather_last = 0.0  # when the first and the last arrived
    self._gather_blocked = False  # the last step found no pages: retry once one is freed
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
    for c in self._gather:
      self._finish_event(c, "abort", error="server shutting down")
    self._gather.clear()
    for s in list(self.sessions.values()):
      await loop.run_in_executor(self._executor, s.close)
    self.sessions.clear()
    if self.implicit is not None:
      await loop.run_in_executor(self._executor, self.implicit.rs.close)
    self._executor.shutdown(wait=True)

  # -- admission --

  @property
  def queue_depth(self) -> int:
    """Jobs queued plus sequences waiting in the engine (two len() reads: atomic, no mutation,
    so /health may read it on the event loop while the worker runs)."""
    return len(self._jobs) + len(self._gather) + self.engine.num_waiting

  def _reserve(self, bounded: bool = True) -> None:
    """Count one more job, or 429 past max_batch running + max_queue waiting."""
    limit = self.engine.max_batch + self.config.max_queue
    if bounded and self._outstanding >= limit:
      self.metrics.requests[("all", "rejected_queue_full")] += 1
      raise ApiError(429, f"server busy: {self._outstanding} requests in flight (limit {limit}); "
                     "retry later", type="rate_limit_exceeded", code="queue_full",
                     headers=retry_after(self.config.retry_after_s))
    self._outstanding += 1

  def submit(self, prompt: list[int], params: SamplingParams, stop: tuple[str, ...],
             request: Request | None = None) -> Completion:
    """Queue a completion: for the engine directly, or (`request`, reuse "tokendance") for
    the next collective step."""
    self.ensure_started()
    self._reserve()
    c = Completion(prompt, params, stop, asyncio.Queue(), request=request)
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
      if not self._jobs and not self._active and not self._gather_ready():
        self._wake.clear()
        wait = self._gather_wait()
        with contextlib.suppress(asyncio.TimeoutError):
          await asyncio.wait_for(self._wake.wait(), wait)
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
      elif job.request is not None:
        if not self._gather:
          self._gather_since = job.arrived
        self._gather_last = max(self._gather_last, job.arrived)
        self._gather.append(job)
      else:
        self._admit(job)
    if self._gather_ready():
      await self._collective(loop)
    if self._active:
      await self._step(loop)

  # -- the collective step (reuse "tokendance") --

  def _gather_deadline(self) -> float:
    """When the gather window closes: `gather_ms` after the last chat arrived (clients of
    one round send within milliseconds of each other, but their prompts are rendered one
    by one), and never later than 10 x `gather_ms` after the first."""
    g = self.config.gather_ms / 1000
    return min(self._gather_last + g, self._gather_since + 10 * g)

  def _gather_ready(self) -> bool:
    """Chats wait for the step until the gather window closes, and after a step found the
    pool full, until a request ends (or none is left running to end)."""
    if not self._gather or (self._gather_blocked and self._active):
      return False
    return time.monotonic() >= self._gather_deadline()

  def _gather_wait(self) -> float | None:
    """Seconds until the gather window closes (None: nothing is gathering)."""
    if not self._gather:
      return None
    return max(self._gather_deadline() - time.monotonic(), 0.0)

  async def _collective(self, loop) -> None:
    """Prefill every gathered chat in one collective step; those that do not fit wait."""
    batch = []
    for c in self._gather:
      if c.cancelled:
        self._finish_event(c, "abort")
      else:
        batch.append(c)
    self._gather = []
    if not batch:
      return
    implicit = self.implicit
    try:
      admitted = await loop.run_in_executor(
          self._executor, lambda: implicit.prefill([c.request for c in batch]))
    except asyncio.CancelledError:
      raise
    except ValueError as e:
      if len(batch) == 1:
        self._finish_event(batch[0], "error", error=str(e), status=400)
        return
      waiting = []  # one bad prompt fails alone: each request in a step of its own
      for c in batch:
        self._gather, self._gather_since, self._gather_last = [c], 0.0, 0.0
        await self._collective(loop)
        waiting += self._gather
      self._gather = waiting
      return
    except OutOfPages as e:
      if self._active:  # pages come back as running requests end
        self._gather, self._gather_blocked = batch, True
        return
      for c in batch:
        self._finish_event(c, "error", error=f"KV pool exhausted: {e}", status=503)
      return
    except Exception as e:  # noqa: BLE001 - answer the batch, keep serving
      log.exception("collective step failed")
      for c in batch:
        self._finish_event(c, "error", error=f"collective step failed: {type(e).__name__}: {e}",
                           status=500)
      if isinstance(e, CacheLost):
        await self._fail_active(loop, f"engine state lost: {e}", 503)
      return
    self._gather_blocked = False
    took = {a.index for a in admitted}
    self._gather = [c for i, c in enumerate(batch) if i not in took]
    self._gather_since = self._gather_last = 0.0  # those left wait no second window
    self.metrics.observe_collective_step(len(admitted))
    for a in admitted:
      c = batch[a.index]
      # computed: its recompute plus the masters it was first to hold, so more than the
      # prompt when it paid for masters it then rechecked; nothing was reused for it then
      c.seq, c.agent, c.cached_tokens = a.seq, a.agent, max(a.reused_tokens, 0)
      c.reuse = {"computed_tokens": a.computed_tokens, "chunk_hit_tokens": a.chunk_hit_tokens,
                 "step_requests": len(admitted)}
      self.metrics.add_chunk_hits(a.chunk_hit_tokens)
      self._active.append(c)
    await self._publish_all(loop)  # the first tokens, sampled by the step itself

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
      if isinstance(e, CacheLost) and self.implicit is not None:
        self.implicit.rs.close()  # the masters' pages hold zeros now
      await self._fail_active(loop, f"engine step failed: {type(e).__name__}: {e}",
                              503 if isinstance(e, OutOfPages) else 500)  # 503: retry later
      return
    await self._publish_all(loop)

  async def _publish_all(self, loop) -> None:
    """Send every active completion's new text; finish those that ended."""
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
      text = stable_prefix(text, c.stop)
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
    if c.agent is not None:  # out of the engine already (finished or aborted): free its table
      self.implicit.release(c.agent)
      c.agent = None
    self._gather_blocked = False  # pages came back: a blocked collective step may fit now
    self._outstanding -= 1
    cached = c.cached_tokens
    if cached is None:
      cached = c.seq.cached_tokens if c.seq is not None else 0
      self.metrics.add_prefix_hits(cached)
    self.metrics.add_reused(cached)
    info = {"finish_reason": reason, "prompt_tokens": len(c.prompt), "cached_tokens": cached,
            "completion_tokens": completion_tokens, "error": error, "status": status,
            "tokendance": c.reuse}
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

  def session_pages_used(self) -> int:
    """Pages the sessions' pools hold (worker thread, or once it stopped)."""
    return sum(s.rs.allocator.num_used for s in list(self.sessions.values()))

  def pool_accounting(self) -> dict[str, int]:
    """Who holds the engine's pages (worker thread, or once it stopped): `unaccounted` counts
    pages in use that neither a sequence nor a cache (prefix blocks, masters) lists: leaks."""
    e = self.engine
    seqs = {p for s in [*e.running, *e.waiting] for p in s.table.pages}
    caches = set(e.prefix.entries.values()) if e.prefix is not None else set()
    if self.implicit is not None:
      caches.update(p for m in self.implicit.masters.masters.values() for p in m.pages)
    return {"pages_in_use": e.allocator.num_used, "sequence_pages": len(seqs),
            "cache_pages": len(caches), "unaccounted": e.allocator.num_used - len(seqs | caches)}

  def gauges(self) -> dict[str, int]:
    """Engine and session gauges for /metrics; call on the worker thread
    (`await worker.call(worker.gauges)`): they read state that steps and rounds change."""
    e, sessions = self.engine, list(self.sessions.values())  # one atomic copy of the dict
    active = {p for s in e.running for p in s.table.pages}
    return {"pages_used": e.allocator.num_used, "pages_free": e.allocator.num_free,
            "kv_pages_active": len(active),
            "prefix_cache_pages": e.prefix.num_pages if e.prefix is not None else 0,
            "master_pages": self.implicit.masters.num_pages if self.implicit else 0,
            "session_pages_used": sum(s.rs.allocator.num_used for s in sessions),
            "session_master_pages": sum(s.rs.masters.num_pages for s in sessions),
            "queue_depth": self.queue_depth, "running": len(e.running),
            "preemptions": e.num_preemptions}
