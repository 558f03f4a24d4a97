"""The server's counters (`Metrics`) and the Prometheus text of /metrics (`prometheus_text`).

FastAPI-free: the worker owns a `Metrics`; the /metrics route (serve/app.py) renders it with
the gauges the worker reads on its thread.
"""

from __future__ import annotations

import collections
import time


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


def prometheus_text(worker, g: dict[str, int]) -> str:
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
