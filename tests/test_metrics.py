"""The /metrics exposition (serve/metrics.py) read back with prometheus_client's own parser.

No app and no engine: `Metrics` is bumped directly, as the worker and the handlers do, and
`MetricsExporter.render` is parsed, so a wrong bucket, a swapped counter or a renamed family
fails here before a dashboard notices.
"""

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tokendance_jax.serve.metrics import COLLECTIVE_STEP_BUCKETS, Metrics, MetricsExporter


def _samples(metrics: Metrics, gauges=None) -> dict[tuple, float]:
  """{(sample name, sorted labels): value} of one scrape."""
  text = MetricsExporter(metrics).render(gauges or {}).decode()
  return {(s.name, tuple(sorted(s.labels.items()))): s.value
          for family in text_string_to_metric_families(text) for s in family.samples}


def _families(metrics: Metrics, gauges=None) -> dict[str, str]:
  """{family name: type} of one scrape, as the parser reads them."""
  text = MetricsExporter(metrics).render(gauges or {}).decode()
  return {f.name: f.type for f in text_string_to_metric_families(text)}


def _bucket(samples, le: str) -> float:
  return samples[("tokendance_collective_step_requests_bucket", (("le", le),))]


def test_collective_step_histogram():
  m = Metrics()
  m.observe_collective_step(3)
  m.observe_collective_step(3)
  s = _samples(m)
  assert s[("tokendance_collective_step_requests_count", ())] == 2
  assert s[("tokendance_collective_step_requests_sum", ())] == 6
  assert _bucket(s, "1.0") == 0 and _bucket(s, "2.0") == 0
  assert _bucket(s, "4.0") == 2 and _bucket(s, "64.0") == 2 and _bucket(s, "+Inf") == 2
  assert s[("tokendance_collective_steps_total", ())] == 2


@pytest.mark.parametrize("n, first_le", [(0, 1), (1, 1), (2, 2), (4, 4), (5, 8), (64, 64),
                                         (65, None)])
def test_collective_step_lands_in_the_first_bucket_holding_it(n, first_le):
  """A bucket counts observations <= its bound: the edges land in their own bucket."""
  m = Metrics()
  m.observe_collective_step(n)
  s = _samples(m)
  for bound in COLLECTIVE_STEP_BUCKETS:
    expected = 1 if first_le is not None and bound >= first_le else 0
    assert _bucket(s, f"{float(bound)}") == expected, (n, bound)
  assert _bucket(s, "+Inf") == 1


def test_token_counters_are_separate():
  """Each add_* method feeds its own counter and no other one."""
  m = Metrics()
  m.add_prefix_hits(3)
  m.add_chunk_hits(5)
  m.add_reused(11)
  m.add_reused(2)
  m.prompt_tokens += 40
  m.add_tokens(7)
  s = _samples(m)
  assert s[("tokendance_prefix_hit_tokens_total", ())] == 3
  assert s[("tokendance_chunk_hit_tokens_total", ())] == 5
  assert s[("tokendance_reused_tokens_total", ())] == 13
  assert s[("tokendance_prompt_tokens_total", ())] == 40
  assert s[("tokendance_generated_tokens_total", ())] == 7
  assert (m.prefix_hit_tokens, m.chunk_hit_tokens, m.reused_tokens) == (3, 5, 13)
  assert s[("tokendance_tokens_per_second", ())] > 0


def test_negative_counts_are_refused():
  m = Metrics()
  for add in (m.add_prefix_hits, m.add_chunk_hits, m.add_reused, m.observe_collective_step):
    with pytest.raises(ValueError, match="negative"):
      add(-1)
  assert _samples(m)[("tokendance_collective_steps_total", ())] == 0


def test_requests_keep_their_labels():
  m = Metrics()
  m.requests[("chat", "ok")] += 2
  m.requests[("completions", "error")] += 1
  s = _samples(m)
  key = "tokendance_requests_total"
  assert s[(key, (("endpoint", "chat"), ("outcome", "ok")))] == 2
  assert s[(key, (("endpoint", "completions"), ("outcome", "error")))] == 1
  assert (key, (("endpoint", "chat"), ("outcome", "error"))) not in s


def test_rounds_and_snapshots_keep_todays_names():
  m = Metrics()
  m.rounds, m.round_seconds_sum = 3, 1.25
  m.snapshots, m.last_snapshot_seconds = 1, 0.5
  s = _samples(m)
  assert s[("tokendance_round_seconds_count", ())] == 3
  assert s[("tokendance_round_seconds_sum", ())] == 1.25
  assert s[("tokendance_snapshots_total", ())] == 1
  assert s[("tokendance_snapshot_seconds", ())] == 0.5


def test_every_gauge_key_is_exposed():
  """Known keys keep today's names and types; an unknown key appears as tokendance_<key>."""
  gauges = {"pages_used": 3, "pages_free": 5, "chat_pages_used": 2, "preemptions": 4,
            "queue_depth": 1, "kv_pages_after_tomorrow": 9}
  s = _samples(Metrics(), gauges)
  assert s[("tokendance_pages_used", ())] == 3
  assert s[("tokendance_pages_free", ())] == 5
  assert s[("tokendance_chat_reuse_pages_used", ())] == 2
  assert s[("tokendance_preemptions_total", ())] == 4
  assert s[("tokendance_queue_depth", ())] == 1
  assert s[("tokendance_kv_pages_after_tomorrow", ())] == 9
  types = _families(Metrics(), gauges)
  assert types["tokendance_kv_pages_after_tomorrow"] == "gauge"
  assert types["tokendance_preemptions"] == "counter"
  assert types["tokendance_collective_step_requests"] == "histogram"


def test_the_latest_gauges_replace_the_previous_ones():
  exporter = MetricsExporter(Metrics())
  assert b"tokendance_pages_used 3.0" in exporter.render({"pages_used": 3})
  text = exporter.render({"pages_free": 1})
  assert b"tokendance_pages_used" not in text and b"tokendance_pages_free 1.0" in text


def test_two_metrics_do_not_share_state():
  """Each app's Metrics and registry stand alone (the global REGISTRY would mix them, and
  refuse the second exporter's names)."""
  a, b = Metrics(), Metrics()
  a.observe_collective_step(2)
  a.add_reused(5)
  a.requests[("chat", "ok")] += 1
  ea, eb = MetricsExporter(a), MetricsExporter(b)
  assert ea.registry is not eb.registry
  sb = _samples(b)
  assert sb[("tokendance_collective_step_requests_count", ())] == 0
  assert sb[("tokendance_reused_tokens_total", ())] == 0
  assert not [k for k in sb if k[0] == "tokendance_requests_total"]
  assert _samples(a)[("tokendance_reused_tokens_total", ())] == 5
  assert b"tokendance_pages_used 2.0" in ea.render({"pages_used": 2})
  assert b"tokendance_pages_used 7.0" in eb.render({"pages_used": 7})
