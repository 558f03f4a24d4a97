"""Fault injection through the HTTP server: failed steps, exhausted pools, cancels, shutdown.

The live server (uvicorn in a thread, TINY random model, byte tokenizer: see
tests/test_server.py) is made to fail where the worker calls into the engine
or a session. After each fault the client gets an answer in the OpenAI error
shape (or a stream that ends), the engine and the session pools hold nothing
they should not, and the next request gives what a clean server gives.
Steps that must happen in a fixed order are ordered with `StepGate` (the
engine step waits for the test), never with sleeps.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import httpx
import pytest
from test_server import MODEL, SESSION, _assert_error, _server, _sse_payloads, params  # noqa: F401

from tokendance_jax import engine as engine_mod
from tokendance_jax.paging import OutOfPages

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story."}],
        "max_tokens": 12, "temperature": 0}
LONG = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 24, "temperature": 1.0,
        "seed": 5}
WAIT_S = 60  # any wait longer than this is a hang


class Fault(RuntimeError):
  """The injected failure."""


class FailAt:
  """Wraps `obj.name`: call number `fail_at` (1-based) raises `exc`; the others go through."""

  def __init__(self, monkeypatch, obj, name, fail_at, exc):
    self.calls, self.fail_at, self.exc = 0, fail_at, exc
    inner = getattr(obj, name)

    def wrapped(*args, **kwargs):
      self.calls += 1
      if self.calls == self.fail_at:
        raise self.exc
      return inner(*args, **kwargs)

    monkeypatch.setattr(obj, name, wrapped)


class StepGate:
  """Holds every `engine.step` until the test grants it (`grant`) or opens the gate (`open`).

  `wait_entered(n)` returns once the worker has reached its n-th step; while
  it waits there, the event loop serves HTTP and the engine is untouched.
  """

  def __init__(self, monkeypatch, engine):
    self.entered, self.opened = 0, False
    self._cond, self._permits = threading.Condition(), threading.Semaphore(0)
    inner = engine.step

    def step():
      with self._cond:
        self.entered += 1
        self._cond.notify_all()
      if not self.opened:
        assert self._permits.acquire(timeout=WAIT_S), "the test never released the step"
      return inner()

    monkeypatch.setattr(engine, "step", step)

  def wait_entered(self, n: int) -> None:
    with self._cond:
      assert self._cond.wait_for(lambda: self.entered >= n, WAIT_S), (n, self.entered)

  def grant(self) -> None:
    self._permits.release()

  def open(self) -> None:
    self.opened = True
    self._permits.release()


def record_cancels(monkeypatch, worker) -> threading.Event:
  """An event set once a handler tells the worker that its client went away."""
  seen, cancel = threading.Event(), worker.cancel

  def wrapped(c):
    if not c.done:
      seen.set()
    return cancel(c)

  monkeypatch.setattr(worker, "cancel", wrapped)
  return seen


def assert_engine_empty(engine, worker=None) -> None:
  """Nothing runs, and only the caches (prefix blocks, the worker's masters) hold pages."""
  assert not engine.running and not engine.waiting and not engine.finished
  held = list(engine.prefix.entries.values()) if engine.prefix is not None else []
  if worker is not None and worker.implicit is not None:
    held += [p for m in worker.implicit.masters.masters.values() for p in m.pages]
  assert engine.allocator.num_used == len(held) == len(set(held))
  assert all(engine.allocator.refcount(p) == 1 for p in held)
  engine.allocator.check_invariants()


def background(fn):
  """Run fn() on a thread; returns (thread, result list holding its value or exception)."""
  out = []

  def run():
    try:
      out.append(fn())
    except Exception as e:  # noqa: BLE001 - handed to the test
      out.append(e)

  t = threading.Thread(target=run, daemon=True)
  t.start()
  return t, out


def chat_text(r) -> str:
  assert r.status_code == 200, r.text
  return r.json()["choices"][0]["message"]["content"]


def streamed_text(payloads) -> str:
  return "".join(p["choices"][0]["delta"].get("content", "") for p in payloads if p["choices"])


@pytest.fixture(scope="module")
def clean(params):  # noqa: F811 - the fixture imported above
  """What a fresh server answers: CHAT's text and LONG's completion text."""
  server, _ = _server(params)
  with server, httpx.Client(base_url=server.url, timeout=WAIT_S) as client:
    chat = chat_text(client.post("/v1/chat/completions", json=CHAT))
    r = client.post("/v1/completions", json=LONG)
    assert r.status_code == 200, r.text
    return {"chat": chat, "long": r.json()["choices"][0]["text"]}


@pytest.fixture(scope="module")
def live(params):  # noqa: F811
  """(httpx.Client on a live server of its own, its Worker)."""
  server, worker = _server(params)
  with server, httpx.Client(base_url=server.url, timeout=WAIT_S) as client:
    yield client, worker


# -- a failing engine step ------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_engine_step_failure_is_a_500_and_the_server_recovers(live, clean, monkeypatch, stream):
  """A step that raises mid-decode (third step: prefill and one decode ran, pages taken) fails
  the request with 500 (non-stream) or an error event then [DONE] (stream); nothing is left
  in the engine, and the same request then gives a clean server's text."""
  client, worker = live
  fault = FailAt(monkeypatch, worker.engine, "step", 3, Fault("injected step failure"))
  r = client.post("/v1/chat/completions", json={**CHAT, "stream": stream})
  assert fault.calls >= 3
  if stream:
    assert r.status_code == 200
    payloads = _sse_payloads(r.text)
    err = payloads[-1]["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "server_error" and "injected step failure" in err["message"]
    assert all(p["choices"][0]["finish_reason"] is None for p in payloads[:-1])
  else:
    _assert_error(r, 500)
    assert r.json()["error"]["type"] == "server_error"
    assert "injected step failure" in r.json()["error"]["message"]
  assert_engine_empty(worker.engine, worker)
  assert chat_text(client.post("/v1/chat/completions", json=CHAT)) == clean["chat"]
  s = client.post("/v1/chat/completions", json={**CHAT, "stream": True})
  assert streamed_text(_sse_payloads(s.text)) == clean["chat"]
  assert_engine_empty(worker.engine, worker)


@pytest.mark.parametrize("stream", [False, True])
def test_engine_out_of_pages_is_a_503_with_retry_after(live, clean, monkeypatch, stream):
  """OutOfPages from a step is the server running short, not a bug: 503 with Retry-After
  (the stream, already under way, ends with an error event); the next request succeeds."""
  client, worker = live
  FailAt(monkeypatch, worker.engine, "step", 2, OutOfPages(1, 0, "injected"))
  r = client.post("/v1/chat/completions", json={**CHAT, "stream": stream})
  if stream:
    err = _sse_payloads(r.text)[-1]["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "server_error" and err["code"] == "out_of_pages"
  else:
    _assert_error(r, 503)
    assert r.headers["retry-after"] == str(worker.config.retry_after_s)
    assert r.json()["error"]["type"] == "server_error"
    assert r.json()["error"]["code"] == "out_of_pages"
  assert_engine_empty(worker.engine, worker)
  assert chat_text(client.post("/v1/chat/completions", json=CHAT)) == clean["chat"]
  assert_engine_empty(worker.engine, worker)


def test_a_bad_prompt_in_a_collective_step_fails_alone(params, clean, monkeypatch):  # noqa: F811
  """A prompt the collective step refuses (ValueError) is answered 400; the request that
  shared its step is prefilled again on its own and gets a clean server's text."""
  import asyncio

  server, worker = _server(params, gather_ms=300)
  prefill = worker.implicit.prefill
  poison = "POISON"
  code = [3 + b for b in poison.encode()]  # the byte tokenizer's ids

  def refusing(requests):
    if any(r.ids[i:i + len(code)] == code for r in requests for i in range(len(r.ids))):
      raise ValueError("refused: a poisoned prompt")
    return prefill(requests)

  monkeypatch.setattr(worker.implicit, "prefill", refusing)
  bad = {**CHAT, "messages": [{"role": "user", "content": f"{poison} story."}]}

  async def both(url):
    async with httpx.AsyncClient(base_url=url, timeout=WAIT_S) as c:
      return await asyncio.gather(c.post("/v1/chat/completions", json=CHAT),
                                  c.post("/v1/chat/completions", json=bad))

  with server:
    good, refused = asyncio.run(both(server.url))
    _assert_error(refused, 400)
    assert "poisoned" in refused.json()["error"]["message"]
    assert chat_text(good) == clean["chat"]
    assert_engine_empty(worker.engine, worker)


def test_a_step_that_loses_the_kv_cache_is_a_500_and_the_server_recovers(live, clean,
                                                                        monkeypatch):
  """A device fault after the decode step took the cache: the request fails with 500 naming
  the lost cache, the engine holds nothing, and the next request gets a clean server's text
  from the engine's new cache."""
  client, worker = live
  inner, calls = engine_mod._model_step, []

  def step(params_, cache, *a, **k):
    calls.append(1)
    if len(calls) == 2:
      cache.k.delete()
      cache.v.delete()
      raise RuntimeError("device fault")
    return inner(params_, cache, *a, **k)

  monkeypatch.setattr(engine_mod, "_model_step", step)
  epoch = worker.engine.cache_epoch
  r = client.post("/v1/chat/completions", json=CHAT)
  _assert_error(r, 500)
  assert "CacheLost" in r.json()["error"]["message"]
  assert worker.engine.cache_epoch == epoch + 1
  assert_engine_empty(worker.engine, worker)
  monkeypatch.setattr(engine_mod, "_model_step", inner)
  assert chat_text(client.post("/v1/chat/completions", json=CHAT)) == clean["chat"]
  assert_engine_empty(worker.engine, worker)


# -- a round that fails ---------------------------------------------------------------------


class OneConnection:
  """Requests on one keep-alive connection (http.client never reconnects behind our back,
  so a server that drops the connection after an answer fails the next request)."""

  def __init__(self, url: httpx.URL):
    self.conn = http.client.HTTPConnection(url.host, url.port, timeout=WAIT_S)

  def request(self, method: str, path: str, body=None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body)
    self.conn.request(method, path, body=data, headers={"content-type": "application/json"})
    r = self.conn.getresponse()
    return r.status, json.loads(r.read())


def test_round_failure_mid_decode_keeps_the_session_usable(live, params, monkeypatch):  # noqa: F811
  """A model step that raises while round 1 decodes: 500 in the OpenAI shape on a connection
  that stays open; the session's pool then holds only its masters and no sequence; round 1
  retried, then round 2, give what a clean session with the same parameters gives."""
  messages = ["Round 0.", "Round 1.", "Round 2."]
  server, _ = _server(params)
  with server, httpx.Client(base_url=server.url, timeout=WAIT_S) as c:
    sid = c.post("/v1/sessions", json=SESSION).json()["id"]
    want = []
    for m in messages:
      r = c.post(f"/v1/sessions/{sid}/rounds", json={"message": m})
      assert r.status_code == 200, r.text
      want.append((r.json()["outputs"], c.get(f"/v1/sessions/{sid}").json()))

  client, worker = live
  conn = OneConnection(client.base_url)
  status, made = conn.request("POST", "/v1/sessions", SESSION)
  assert status == 200, made
  sid = made["id"]
  rs = worker.sessions[sid].rs
  try:
    status, out = conn.request("POST", f"/v1/sessions/{sid}/rounds", {"message": messages[0]})
    assert status == 200 and out["outputs"] == want[0][0], out
    fault = FailAt(monkeypatch, engine_mod, "_model_step", 2, Fault("injected model step"))
    status, out = conn.request("POST", f"/v1/sessions/{sid}/rounds", {"message": messages[1]})
    assert fault.calls >= 2, "the round never reached its second decode step"
    monkeypatch.undo()
    assert status == 500, out
    assert set(out["error"]) == {"message", "type", "param", "code"}
    assert out["error"]["type"] == "server_error"
    assert "injected model step" in out["error"]["message"]
    assert not rs.engine.running and not rs.engine.waiting and not rs.engine.finished
    assert rs.allocator.num_used == rs.masters.num_pages > 0
    rs.allocator.check_invariants()
    status, info = conn.request("GET", f"/v1/sessions/{sid}")  # the same connection
    assert status == 200 and info["rounds"] == 1, info
    assert info["pages_in_use"] == rs.allocator.num_used
    for k in (1, 2):
      status, out = conn.request("POST", f"/v1/sessions/{sid}/rounds", {"message": messages[k]})
      assert status == 200, out
      assert out["outputs"] == want[k][0], f"round {k} differs from a clean session's"
      info = client.get(f"/v1/sessions/{sid}").json()
      for key in ("rounds", "agents", "pages_in_use", "master_pages"):
        assert info[key] == want[k][1][key], key
  finally:
    conn.conn.close()
    assert client.delete(f"/v1/sessions/{sid}").status_code == 200
  assert rs.allocator.num_used == 0
  assert_engine_empty(worker.engine, worker)


# -- a client that leaves while its request waits ---------------------------------------------


@pytest.mark.parametrize("where", ["worker_queue", "engine_queue"])
def test_cancel_while_queued_leaves_nothing(params, clean, monkeypatch, where):  # noqa: F811
  """max_batch=1 and a first request running: a second, streamed request whose client goes
  away while it still waits (in the worker's queue, or admitted to the engine's waiting queue)
  never runs and leaves no sequence or page; the first gives a clean server's text."""
  server, worker = _server(params, max_batch=1)
  engine = worker.engine
  with server, httpx.Client(base_url=server.url, timeout=WAIT_S) as client:
    gate = StepGate(monkeypatch, engine)
    cancelled = record_cancels(monkeypatch, worker)
    try:
      first, out = background(lambda: client.post("/v1/completions", json=LONG))
      gate.wait_entered(1)  # the first is in the engine; the worker waits on its first step
      second = {**LONG, "prompt": "A second story", "stream": True}
      with client.stream("POST", "/v1/completions", json=second) as s:
        assert s.status_code == 200
        if where == "engine_queue":
          gate.grant()  # step 1 runs; the loop then admits the second and waits on step 2
          gate.wait_entered(2)
          assert engine.num_waiting == 1 and len(engine.running) == 1
      assert cancelled.wait(WAIT_S), "the server never saw the client go away"
    finally:
      gate.open()
    first.join(WAIT_S)
    assert not first.is_alive()
    r = out[0]
    assert not isinstance(r, Exception), r
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == clean["long"]
    assert_engine_empty(engine, worker)
    assert worker.queue_depth == 0
    assert chat_text(client.post("/v1/chat/completions", json=CHAT)) == clean["chat"]
    assert_engine_empty(engine, worker)


# -- shutdown with work in flight ------------------------------------------------------------


def _refused(server) -> bool:
  try:
    socket.create_connection((server.host, server.port), timeout=1).close()
  except OSError:
    return True
  return False


def _wait_until(pred, what: str) -> None:
  deadline = time.monotonic() + WAIT_S
  while not pred():
    assert time.monotonic() < deadline, f"timed out waiting until {what}"
    time.sleep(0.02)


@pytest.mark.parametrize("stream", [False, True])
def test_graceful_shutdown_finishes_the_request_in_flight(params, clean, monkeypatch, stream):  # noqa: F811
  """Shutdown begins while a request decodes: uvicorn stops taking connections, the request
  still finishes with a clean server's text, then the worker closes with the pool empty."""
  server, worker = _server(params)
  gate = StepGate(monkeypatch, worker.engine)
  with server:
    client = httpx.Client(base_url=server.url, timeout=WAIT_S)
    try:
      t, out = background(lambda: client.post("/v1/completions", json={**LONG, "stream": stream}))
      gate.grant()
      gate.wait_entered(2)  # prefilled, decoding
      server.server.should_exit = True
      _wait_until(lambda: _refused(server), "the server stops taking connections")
      gate.open()
      t.join(WAIT_S)
      assert not t.is_alive(), "the request in flight hung at shutdown"
    finally:
      gate.open()
  client.close()
  assert not server._thread.is_alive()
  r = out[0]
  assert not isinstance(r, Exception), r
  assert r.status_code == 200, r.text
  if stream:
    text = "".join(p["choices"][0]["text"] for p in _sse_payloads(r.text))
  else:
    text = r.json()["choices"][0]["text"]
  assert text == clean["long"]
  assert not worker.alive
  assert_engine_empty(worker.engine, worker)


@pytest.mark.parametrize("stream", [False, True])
def test_forced_shutdown_ends_the_request_in_flight(params, monkeypatch, stream):  # noqa: F811
  """Shutdown past its grace period cancels the handler of a request that is still decoding:
  the client's request ends (an error or a closed connection, never a hang), the worker stops
  and the engine's pages are freed."""
  server, worker = _server(params)
  server.server.config.timeout_graceful_shutdown = 0.5
  gate = StepGate(monkeypatch, worker.engine)
  cancelled = record_cancels(monkeypatch, worker)
  with server:
    client = httpx.Client(base_url=server.url, timeout=WAIT_S)
    try:
      t, out = background(lambda: client.post("/v1/completions", json={**LONG, "stream": stream}))
      gate.grant()
      gate.wait_entered(2)  # prefilled; the worker waits on a decode step
      server.server.should_exit = True
      assert cancelled.wait(WAIT_S), "the handler in flight was never cancelled"
      gate.open()
      t.join(WAIT_S)
      assert not t.is_alive(), "the request in flight hung at shutdown"
    finally:
      gate.open()
  client.close()
  assert not server._thread.is_alive()
  r = out[0]
  assert not isinstance(r, httpx.TimeoutException), r
  if stream:  # cut short: the stream ends without claiming to be complete
    assert isinstance(r, httpx.TransportError) or (
        r.status_code == 200 and "data: [DONE]" not in r.text), r
  else:  # the cancelled handler never answered: uvicorn's own plain-text 500, or a drop
    assert isinstance(r, httpx.TransportError) or r.status_code == 500, r
  assert not worker.alive
  assert_engine_empty(worker.engine, worker)
