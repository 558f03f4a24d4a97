"""The server's counters (`Metrics`) and their Prometheus exposition (`MetricsExporter`).

FastAPI-free: the worker owns a `Metrics` and bumps it from its thread and the event loop; the
/metrics route (serve/app.py) hands a per-app `MetricsExporter` the gauges the worker read on
its thread and returns `generate_latest(exporter.registry)`. The exporter is a custom
collector over a private `CollectorRegistry`, never prometheus_client's global REGISTRY: one
process (the tests, a benchmark) builds many apps, and the global one would mix their counts
and refuse a second registration of the same names.
"""

from __future__ import annotations

import bisect
import collections
import threading
import time
from collections.abc import Iterator, Mapping

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
  CounterMetricFamily,
  GaugeMetricFamily,
  HistogramMetricFamily,
  Metric,
  SummaryMetricFamily,
)
from prometheus_client.utils import floatToGoString

# Upper bounds of tokendance_collective_step_requests: how many requests one collective step
# served. Powers of two up to the widest batch the engine is run with in practice.
COLLECTIVE_STEP_BUCKETS = (1, 2, 4, 8, 16, 32, 64)

# Gauge keys of `Worker.gauges()` with a known meaning: key -> (exposed name without the
# tokendance_ prefix, "gauge" or "counter", help). A counter's family name leaves off `_total`
# (prometheus_client appends it), so "preemptions" is exposed as tokendance_preemptions_total
# as before. chat_pages_used keeps the name dashboards already read. Any other key is exposed
# as the gauge tokendance_<key> with `_GENERIC_HELP`, so new worker gauges need no change here.
KNOWN_GAUGES: dict[str, tuple[str, str, str]] = {
    "pages_used": ("pages_used", "gauge", "engine KV pages in use"),
    "pages_free": ("pages_free", "gauge", "engine KV pages free"),
    "session_pages_used": ("session_pages_used", "gauge", "KV pages held by sessions"),
    "session_master_pages": ("session_master_pages", "gauge",
                             "shared master pages held by sessions"),
    "chat_pages_used": ("chat_reuse_pages_used", "gauge",
                        "KV pages of the marked-chat reuse pool"),
    "queue_depth": ("queue_depth", "gauge", "requests waiting"),
    "running": ("running", "gauge", "sequences decoding"),
    "sessions": ("sessions", "gauge", "open sessions"),
    "preemptions": ("preemptions", "counter", "engine preemptions"),
    "kv_pages_active": ("kv_pages_active", "gauge", "KV pages referenced by running sequences"),
    "prefix_cache_pages": ("prefix_cache_pages", "gauge",
                           "KV pages held by the automatic prefix cache"),
    "master_pages": ("master_pages", "gauge", "KV pages of shared-chunk masters"),
}
_GENERIC_HELP = "worker gauge {key}"

__all__ = ["CONTENT_TYPE_LATEST", "COLLECTIVE_STEP_BUCKETS", "KNOWN_GAUGES", "Metrics",
           "MetricsExporter"]


class Metrics:
  """Counters behind /metrics, bumped by the worker and the HTTP handlers.

  Plain ints and a `collections.Counter` so callers write `metrics.prompt_tokens += n` and
  `metrics.requests[(endpoint, outcome)] += 1`; `MetricsExporter` reads them at scrape time.
  The rate window and the step histogram are read and written under a lock: the worker thread
  appends while the event loop scrapes, and iterating a deque that grows raises.
  """

  def __init__(self):
    self.requests = collections.Counter()  # (endpoint, outcome) -> n
    self.prompt_tokens = 0
    self.generated_tokens = 0
    self.prefix_hit_tokens = 0
    self.chunk_hit_tokens = 0
    self.reused_tokens = 0
    self.round_seconds_sum = 0.0
    self.rounds = 0
    self.snapshots = 0
    self.last_snapshot_seconds = 0.0
    self.collective_steps = 0
    self.collective_step_requests_sum = 0
    # one count per bucket of COLLECTIVE_STEP_BUCKETS plus the +Inf overflow (not cumulative)
    self._step_counts = [0] * (len(COLLECTIVE_STEP_BUCKETS) + 1)
    self._recent: collections.deque[tuple[float, int]] = collections.deque()
    self._lock = threading.Lock()

  def add_tokens(self, n: int) -> None:
    """Count `n` generated tokens, also in the 10 s window of `tokens_per_second`."""
    now = time.monotonic()
    with self._lock:
      self.generated_tokens += n
      self._recent.append((now, n))
      while self._recent and now - self._recent[0][0] > 10.0:
        self._recent.popleft()

  def tokens_per_second(self) -> float:
    """Generated tokens per second over the last 10 s (over at least 1 s, so one burst right
    after idling does not read as a huge rate)."""
    now = time.monotonic()
    with self._lock:
      recent = [(t, n) for t, n in self._recent if now - t <= 10.0]
    if not recent:
      return 0.0
    return sum(n for _, n in recent) / max(now - recent[0][0], 1.0)

  def add_prefix_hits(self, n: int) -> None:
    """Count `n` prompt tokens whose KV came from the automatic prefix cache."""
    self.prefix_hit_tokens += _count(n)

  def add_chunk_hits(self, n: int) -> None:
    """Count `n` prompt tokens whose KV came from a content-defined shared chunk's master."""
    self.chunk_hit_tokens += _count(n)

  def add_reused(self, n: int) -> None:
    """Count `n` prompt tokens not computed, by whatever path: the denominator-free total the
    hit counters above are parts of, so a new reuse path shows up here before it has its own."""
    self.reused_tokens += _count(n)

  def observe_collective_step(self, n_requests: int) -> None:
    """Record one collective step that served `n_requests` requests together (the histogram
    shows how well steps batch; its count is the number of steps)."""
    n = _count(n_requests)
    with self._lock:
      self._step_counts[bisect.bisect_left(COLLECTIVE_STEP_BUCKETS, n)] += 1
      self.collective_steps += 1
      self.collective_step_requests_sum += n

  def collective_step_histogram(self) -> tuple[list[tuple[str, int]], int]:
    """The step histogram as Prometheus wants it: ([(upper bound, cumulative count)] with
    +Inf last, sum of requests), read in one go so the count and the sum agree."""
    with self._lock:
      counts, total = list(self._step_counts), self.collective_step_requests_sum
    bounds = [floatToGoString(b) for b in COLLECTIVE_STEP_BUCKETS] + ["+Inf"]  # "4.0", as
    # prometheus_client's own Histogram writes them
    cumulative = [sum(counts[:i + 1]) for i in range(len(counts))]
    return list(zip(bounds, cumulative, strict=True)), total


def _count(n: int) -> int:
  """`n` as a count: a negative one is a caller's bug that would make a counter go down."""
  if n < 0:
    raise ValueError(f"a count cannot be negative, got {n}")
  return int(n)


class MetricsExporter:
  """A custom collector over one `Metrics` and the latest worker gauges, in its own registry.

  Usage per scrape, on the event loop: `exporter.render(gauges)` (or set `exporter.gauges` and
  call `generate_latest(exporter.registry)`). The gauges are a dict str -> number from
  `Worker.gauges()`; every key is exposed (see `KNOWN_GAUGES`).
  """

  def __init__(self, metrics: Metrics):
    self.metrics = metrics
    self.gauges: Mapping[str, float] = {}
    self.registry = CollectorRegistry(auto_describe=False)
    self.registry.register(self)

  def render(self, gauges: Mapping[str, float]) -> bytes:
    """The exposition text for these gauges and the counters as they are now."""
    self.gauges = gauges
    return generate_latest(self.registry)

  def collect(self) -> Iterator[Metric]:
    yield from _gauge_families(self.gauges)
    yield from _counter_families(self.metrics)


def _gauge_families(gauges: Mapping[str, float]) -> Iterator[Metric]:
  for key, value in sorted(gauges.items()):
    name, kind, help_text = KNOWN_GAUGES.get(key, (key, "gauge", _GENERIC_HELP.format(key=key)))
    family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
    yield family(f"tokendance_{name}", help_text, value=value)


def _counter_families(m: Metrics) -> Iterator[Metric]:
  counters = (
      ("prompt_tokens", "prompt tokens accepted", m.prompt_tokens),
      ("generated_tokens", "tokens generated", m.generated_tokens),
      ("prefix_hit_tokens", "prompt tokens served from the automatic prefix cache",
       m.prefix_hit_tokens),
      ("chunk_hit_tokens", "prompt tokens served from shared chunks' masters",
       m.chunk_hit_tokens),
      ("reused_tokens", "prompt tokens not computed (all reuse paths)", m.reused_tokens),
      ("snapshots", "session snapshots saved", m.snapshots),
      ("collective_steps", "collective steps run", m.collective_steps),
  )
  for name, help_text, value in counters:
    yield CounterMetricFamily(f"tokendance_{name}", help_text, value=value)
  yield GaugeMetricFamily("tokendance_tokens_per_second", "generation rate over the last 10 s",
                          value=round(m.tokens_per_second(), 3))
  yield GaugeMetricFamily("tokendance_snapshot_seconds", "duration of the last snapshot",
                          value=m.last_snapshot_seconds)
  # exposed as tokendance_round_seconds_count and _sum, the names of the two counters before
  yield SummaryMetricFamily("tokendance_round_seconds", "session round latency",
                            count_value=m.rounds, sum_value=m.round_seconds_sum)
  steps = HistogramMetricFamily("tokendance_collective_step_requests",
                                "requests served by one collective step")
  buckets, total = m.collective_step_histogram()
  steps.add_metric([], buckets, sum_value=total)
  yield steps
  requests = CounterMetricFamily("tokendance_requests", "HTTP generation requests by outcome",
                                 labels=["endpoint", "outcome"])
  for (endpoint, outcome), n in sorted(dict(m.requests).items()):
    requests.add_metric([endpoint, outcome], n)
  yield requests
