"""Rounds on a tiny random model: every reuse path at recompute 1.0 equals full recompute,
mirrors are lossless, the collective step matches per-request PIC, nothing leaks."""

import dataclasses

import jax
import numpy as np
import pytest

from tokendance_jax import model, session
from tokendance_jax.collect import Collector
from tokendance_jax.config import TINY, CacheConfig
from tokendance_jax.engine import build_batch
from tokendance_jax.layout import layout_wave
from tokendance_jax.paging import BlockTable, pages_needed
from tokendance_jax.rounds import AgentPrompt, ReusePolicy, Round, Segment, segment_key
from tokendance_jax.session import METHODS, RoundSession

CFG = dataclasses.replace(TINY, eos_ids=())  # no early stop: every agent writes max_tokens
POOL = CacheConfig(num_pages=160, page_size=8)
N_AGENTS = 4


@pytest.fixture(scope="module")
def params():
  return model.init_params(CFG, jax.random.PRNGKey(0))


class Workload:
  """System prompt shared, persona private, last round's outputs shared (All-Gather)."""

  def __init__(self, seed=0, order="canonical"):
    rng = np.random.default_rng(seed)
    self.system = Segment(tuple(rng.integers(3, CFG.vocab_size, 37)), True, "system")
    self.personas = [Segment(tuple(rng.integers(3, CFG.vocab_size, int(rng.integers(5, 30)))),
                             False, f"persona{i}") for i in range(N_AGENTS)]
    self.order = order
    self.rng = rng

  def round(self, r, prev):
    prompts = []
    for i in range(N_AGENTS):
      segs = [self.system, self.personas[i]]
      others = list(range(N_AGENTS))
      if self.order == "random":
        self.rng.shuffle(others)
      for j in others:
        if prev and prev[f"a{j}"]:
          segs.append(Segment(tuple(prev[f"a{j}"]), True, f"out{j}"))
      segs.append(Segment((5, 6, 7, 8 + i, 9 + r), False, "tail"))
      prompts.append(AgentPrompt(f"a{i}", segs, max_tokens=6 + i))
    return Round(prompts)


def run(params, method, policy=ReusePolicy(), rounds=3, order="canonical", **kw):
  sess = RoundSession(params, CFG, method=method, policy=policy, cache_cfg=POOL, **kw)
  wl, prev, results = Workload(order=order), None, []
  for r in range(rounds):
    res = sess.run_round(wl.round(r, prev))
    prev = res.outputs
    results.append(res)
  return sess, results


@pytest.fixture(scope="module")
def full_run(params):
  return run(params, "full", quality=False)[1]


@pytest.mark.parametrize("method,select,extra", [
    ("prefix", "cacheblend", {}), ("cacheblend", "cacheblend", {}), ("epic", "epic", {}),
    ("tokendance", "cacheblend", {}), ("tokendance", "block", {}), ("tokendance", "epic", {}),
    ("tokendance", "block", {"masters": "anchored"}),
    ("tokendance", "block", {"masters": "decode"}),
    ("tokendance", "block", {"tau": 0.0}),
    ("cacheblend", "cacheblend", {"masters": "decode"}),
    ("cacheblend", "cacheblend", {"masters": "anchored"})])
def test_recompute_one_equals_full(params, full_run, method, select, extra):
  """Recompute fraction 1.0 (epic: k >= any block) must reproduce full recompute, under every
  master policy (context is the default) and in the threshold mode at tau 0."""
  policy = ReusePolicy(select=select, recompute=1.0, epic_k=10_000, **extra)
  sess, results = run(params, method, policy)
  for res, ref in zip(results, full_run, strict=True):
    assert res.outputs == ref.outputs
    assert res.quality["top1_agreement"] == 1.0
    assert res.quality["max_kl"] < 1e-6
  sess.close()
  assert sess.allocator.num_used == 0


def test_collective_matches_per_request(params):
  """Same selection policy: the batched collector gives per-request CacheBlend's outputs."""
  policy = ReusePolicy(select="cacheblend", recompute=0.3)
  _, td = run(params, "tokendance", policy)
  _, cb = run(params, "cacheblend", policy)
  for a, b in zip(td, cb, strict=True):
    assert a.outputs == b.outputs
    assert a.stats["computed_tokens"] == b.stats["computed_tokens"]
  # The test is sensitive: at 0.3 the reused cache really differs from full recompute.
  assert max(r.quality["mean_kl"] for r in td) > 1e-6
  # Mirrors keep only touched blocks: less shared-region KV than dense per-request copies.
  assert td[-1].shared_kv_bytes_per_agent < cb[-1].shared_kv_bytes_per_agent


def test_mirror_is_lossless(params):
  """Decoding through a mirror table equals decoding from its dense materialization, bit for bit."""
  policy = ReusePolicy(select="cacheblend", recompute=0.2)
  sess = RoundSession(params, CFG, method="tokendance", policy=policy, cache_cfg=POOL,
                      quality=False)
  wl = Workload()
  prev = sess.run_round(wl.round(0, None)).outputs
  rnd = wl.round(1, prev)
  stats = session.new_stats()
  sess.builder.build(rnd, stats)  # the masters of round 0's outputs
  agents = layout_wave(rnd.prompts, sess.strategy, sess.ctx)
  sess.strategy.prefill(agents, sess.ctx, sess.collector, stats)
  assert any(a.mirror_blocks for a in agents)
  assert any(set(a.table.pages) & {p for m in sess.masters.masters.values() for p in m.pages}
             for a in agents)
  dense = []
  for a in agents:  # materialize: copy every page of the mirror into fresh pages
    t = BlockTable(POOL.page_size)
    t.pages = sess.allocator.alloc(len(a.table.pages))
    src = np.array(a.table.pages, np.int32)
    sess.engine.cache = model.KVCache(
        k=sess.engine.cache.k.at[:, :, np.array(t.pages)].set(sess.engine.cache.k[:, :, src]),
        v=sess.engine.cache.v.at[:, :, np.array(t.pages)].set(sess.engine.cache.v[:, :, src]))
    t.starts, t.lens, t.end = list(a.table.starts), list(a.table.lens), a.table.end
    dense.append(t)
  for tables in ([a.table for a in agents], dense):  # decode one token past each prompt
    for t, a in zip(tables, agents, strict=True):
      t.ensure(len(a.tokens) + 1, sess.allocator)
  logits = []
  for tables in ([a.table for a in agents], dense):
    chunks = [(t, a.tokens + [11], np.array([len(a.tokens)])) for t, a in zip(tables, agents,
                                                                                strict=True)]
    batch, *_ = build_batch(chunks, decode=True)
    out, _ = model.forward(params, sess.engine.cache, batch, cfg=CFG, attn=sess.attn, decode=True)
    logits.append(np.asarray(out[:len(agents)]))
  np.testing.assert_array_equal(logits[0], logits[1])


def test_twenty_rounds_leave_no_leaked_page(params):
  sess, results = run(params, "tokendance", ReusePolicy(select="block", recompute=0.25),
                      rounds=20, quality=False)
  in_use = [r.pages_in_use for r in results]
  assert max(in_use[5:]) <= 1.5 * max(in_use[:5])  # bounded, not growing with rounds
  sess.allocator.check_invariants()
  sess.close()
  assert sess.allocator.num_used == 0


def test_prefix_cache_hits_the_shared_system_prompt(params):
  sess, results = run(params, "prefix")
  assert sess.prefix.hits > 0
  assert results[-1].stats["computed_fraction"] < 1.0
  sess.close()
  assert sess.allocator.num_used == 0


def test_reordered_shared_blocks_still_reuse(params):
  """Different orders per agent: masters serve any offset, prefix caching cannot."""
  # Output masters from the authors' decode: each is computed at its author's own offset,
  # so this checks reuse at any offset on its own.
  policy = ReusePolicy(recompute=0.2, masters="decode")
  _, td = run(params, "tokendance", policy, order="random")
  assert td[-1].stats["computed_fraction"] < 0.9
  assert td[-1].quality["top1_agreement"] >= 0.5


@pytest.mark.parametrize("make,match", [
    (lambda s: Round([]), "no agents"),
    (lambda s: Round([AgentPrompt("a", [s]), AgentPrompt("a", [s])]), "duplicate agent"),
    (lambda s: Round([AgentPrompt("a", [Segment((3,) * 600)])]), "exceeds the model context"),
    (lambda s: Round([AgentPrompt("a", [Segment((3, 999))])]), "outside"),
    (lambda s: Round([AgentPrompt("a", [Segment((3, 4), shared=True)])]), "last segment"),
    (lambda s: Round([AgentPrompt("a", [Segment(())])]), "empty"),
])
def test_bad_rounds_raise_before_any_page_is_touched(params, make, match):
  sess = RoundSession(params, CFG, method="tokendance", cache_cfg=POOL)
  with pytest.raises(ValueError, match=match):
    sess.run_round(make(Segment((3, 4, 5))))
  assert sess.allocator.num_used == 0


def test_sampling_set_on_a_session_applies_to_its_next_round(params):
  """The server sets each chat request's sampling on its session; the next round must use it."""
  from tokendance_jax.sampling import SamplingParams

  hot = SamplingParams(temperature=1.5, seed=11)
  made_hot = RoundSession(params, CFG, method="tokendance", cache_cfg=POOL, quality=False,
                          sampling=hot)
  set_hot = RoundSession(params, CFG, method="tokendance", cache_cfg=POOL, quality=False)
  greedy = set_hot.run_round(Workload().round(0, None)).outputs
  set_hot.close()
  set_hot.sampling = hot
  assert set_hot.sampling == hot
  out = set_hot.run_round(Workload().round(0, None)).outputs
  assert out == made_hot.run_round(Workload().round(0, None)).outputs
  assert out != greedy  # the test can tell sampled from greedy outputs


def test_segments_by_id(params):
  """A later round can name an earlier output by its id; an unknown id is refused up front."""
  from tokendance_jax.rounds import SegmentRef

  sess = RoundSession(params, CFG, method="tokendance", cache_cfg=POOL, quality=False)
  res = sess.run_round(Workload().round(0, None))
  tail = Segment((5, 6, 7), name="tail")
  ref = SegmentRef(res.output_keys["a1"], name="out1")
  res2 = sess.run_round(Round([AgentPrompt("a0", [ref, tail], max_tokens=3)]))
  assert len(res2.outputs["a0"]) == 3
  with pytest.raises(ValueError, match="unknown segment id"):
    sess.run_round(Round([AgentPrompt("a0", [SegmentRef("nope"), tail])]))
  sess.close()
  assert sess.allocator.num_used == 0


def test_unknown_method_and_bad_policy():
  with pytest.raises(ValueError, match="method"):
    RoundSession({}, CFG, method="magic")
  with pytest.raises(ValueError, match="recompute"):
    ReusePolicy(recompute=1.5)
  with pytest.raises(ValueError, match="select"):
    ReusePolicy(select="random")


def test_pool_too_small_raises_and_frees(params):
  from tokendance_jax.paging import OutOfPages

  sess = RoundSession(params, CFG, method="full", cache_cfg=CacheConfig(num_pages=8, page_size=8))
  with pytest.raises(OutOfPages):
    sess.run_round(Workload().round(0, None))
  assert sess.allocator.num_used == 0


def test_methods_listed():
  assert set(METHODS) == {"full", "prefix", "cacheblend", "epic", "tokendance"}
  assert pages_needed(17, 8) == 3


def test_context_masters_are_exact_where_prompts_agree(params):
  """Every prompt holds [system, news, doc_a, doc_b] then a private tail. Context masters
  compute the whole shared run as one sequence, which is exactly what every agent computes
  (outputs equal full at recompute 0); anchored masters are exact only for the segment right
  after the system prompt, so doc_a and doc_b (computed without news before them) drift."""
  rng = np.random.default_rng(7)
  shared = [Segment(tuple(rng.integers(3, CFG.vocab_size, n)), True, name)
            for n, name in ((21, "system"), (19, "news"), (13, "doc_a"), (17, "doc_b"))]
  tails = [Segment(tuple(rng.integers(3, CFG.vocab_size, 4 + i)), False, "tail") for i in range(3)]
  rnd = Round([AgentPrompt(f"a{i}", [*shared, t], max_tokens=5) for i, t in enumerate(tails)])
  full = RoundSession(params, CFG, method="full", cache_cfg=POOL, quality=False).run_round(rnd)
  kl = {}
  for masters in ("context", "anchored"):
    policy = ReusePolicy(select="cacheblend", recompute=0.0, masters=masters)
    sess = RoundSession(params, CFG, method="tokendance", policy=policy, cache_cfg=POOL)
    res = sess.run_round(rnd)
    kl[masters] = res.quality["max_kl"]
    assert res.stats["computed_fraction"] < 0.3  # only the private tails were computed
    assert res.stats["master_tokens"] == sum(len(s) for s in shared)
    if masters == "context":
      assert res.outputs == full.outputs
    sess.close()
    assert sess.allocator.num_used == 0
  assert kl["context"] < 1e-6 < kl["anchored"]


def test_a_master_computed_after_an_inexact_one_is_not_marked_exact(params):
  """Round A holds [system, doc_x, news]: news' master is computed after doc_x. Round B holds
  [system, news, doc_a]: news is read from that master, which is not what round B's prompts
  compute at its place, so doc_a's master (computed after it) must not claim an exact context;
  else, once news were recomputed exactly, the check would skip doc_a as an exact head."""
  rng = np.random.default_rng(11)
  system, doc_x, news, doc_a = (Segment(tuple(rng.integers(3, CFG.vocab_size, n)), True, name)
                                for n, name in ((21, "system"), (9, "doc_x"), (19, "news"),
                                                (13, "doc_a")))
  tails = [Segment((5, 6, 7 + i), False, "tail") for i in range(3)]
  sess = RoundSession(params, CFG, method="tokendance", cache_cfg=POOL, quality=False,
                      policy=ReusePolicy(select="block", recompute=0.0))
  sess.run_round(Round([AgentPrompt(f"a{i}", [system, doc_x, news, t], max_tokens=2)
                        for i, t in enumerate(tails)]))
  assert sess.masters.get(news.key).context == segment_key(system.tokens + doc_x.tokens)
  sess.run_round(Round([AgentPrompt(f"a{i}", [system, news, doc_a, t], max_tokens=2)
                        for i, t in enumerate(tails)]))
  assert sess.masters.get(system.key).context == segment_key(())
  assert sess.masters.get(doc_a.key).context is None
  sess.close()
  assert sess.allocator.num_used == 0


def test_context_masters_read_earlier_masters_and_compute_only_new_segments(params):
  """Round 2 of a session: the system prompt already has its master; only round 1's outputs
  are computed, in one sequence that reads the system master as context."""
  policy = ReusePolicy(select="block", recompute=0.0)
  sess, results = run(params, "tokendance", policy, rounds=2, quality=False)
  new_outputs = sum(len(ids) for ids in results[0].outputs.values())
  assert results[1].stats["master_tokens"] == new_outputs
  assert all(m.source == "context" for m in sess.masters.masters.values())
  sess.close()
  assert sess.allocator.num_used == 0


def test_keep_masters_evicts_least_recently_used_only_under_pressure(params):
  """keep_masters: masters outlive the rounds that use them and are evicted oldest first
  only when the pool runs short; a round's own masters are never evicted mid-round."""
  rng = np.random.default_rng(11)
  pool = CacheConfig(num_pages=28, page_size=8)
  policy = ReusePolicy(select="block", recompute=0.2)
  sess = RoundSession(params, CFG, method="tokendance", policy=policy, cache_cfg=pool,
                      quality=False, keep_masters=True)
  docs = [Segment(tuple(rng.integers(3, CFG.vocab_size, 30)), True, f"doc{i}") for i in range(6)]

  def ask(doc):
    res = sess.run_round(Round([AgentPrompt("a", [Segment((5, 6, 7), False), doc,
                                                  Segment((8, 9), False)], max_tokens=3)]))
    sess.allocator.check_invariants()
    return res

  ask(docs[0])
  ask(docs[1])
  assert {docs[0].key, docs[1].key} <= set(sess.masters.masters)  # kept, no pressure yet
  for d in docs[2:]:
    ask(d)
  assert docs[0].key not in sess.masters  # the oldest went first
  assert docs[-1].key in sess.masters
  before = sess.masters.num_pages
  res = ask(docs[-1])  # reused: nothing new to prefill
  assert res.stats["master_prefill_seconds"] == 0.0 and sess.masters.num_pages >= before
  sess.close()
  assert sess.allocator.num_used == 0


def test_phases_are_timed_and_traced(params, tmp_path):
  """Each round's prefill phases land in `timeline` and, under a trace, as named spans
  whose XLA thunks `profiling.summarize` attributes to the jitted steps."""
  from tokendance_jax import profiling

  with profiling.trace(str(tmp_path)):
    sess, results = run(params, "tokendance", rounds=2, quality=False)
  names = {name for name, _, _ in sess.timeline}
  assert {"master_prefill", "check", "copy", "recompute"} <= names
  assert all(t1 >= t0 for _, t0, t1 in sess.timeline)
  stats = results[-1].stats
  assert 0 < stats["computed_flops"] and 0 < stats["check_flops"]
  _, full = run(params, "full", rounds=1, quality=False)
  prompts = Workload().round(0, None).prompts  # full computes every position of every prompt
  assert full[0].stats["computed_flops"] == pytest.approx(
      sum(CFG.prefill_flops(np.arange(p.num_tokens)) for p in prompts), rel=1e-12)
  summary = profiling.summarize(str(tmp_path))
  assert {"check", "recompute", "master_prefill"} <= set(summary)
  rec = summary["recompute"]
  assert rec["spans"] >= 2 and 0 < rec["thunk_seconds"]
  assert any("model_step" in f for f in rec["by_function"])
  assert any("check_deviation" in f for f in summary["check"]["by_function"])


@pytest.mark.parametrize("masters", ["context", "anchored"])
def test_the_check_skips_the_exact_head_and_selects_the_same_past_it(params, monkeypatch,
                                                                     masters):
  """The system prompt every prompt starts with has an exact master, so the check does not
  recompute it: fewer tokens checked, the same outputs, and the same selection past the
  head as a check over every token. That check sees the head's deviation as 0, so it ranks
  the head last and takes head tokens only with budget left over; skipping the head takes
  none (recomputing them would give the same K/V)."""
  policy = ReusePolicy(select="cacheblend", recompute=0.3, masters=masters)
  _, fast = run(params, "tokendance", policy, rounds=2, quality=False)
  monkeypatch.setattr(Collector, "exact_head", lambda self, a: 0)
  _, slow = run(params, "tokendance", policy, rounds=2, quality=False)
  system = len(Workload().system)
  for a, b in zip(fast, slow, strict=True):
    assert a.outputs == b.outputs
    assert a.stats["checked_tokens"] == b.stats["checked_tokens"] - N_AGENTS * system
    for agent, redone in a.stats["shared_recomputed_per_agent"].items():
      assert redone <= b.stats["shared_recomputed_per_agent"][agent] <= redone + system
    assert a.stats["pages_copied"] <= b.stats["pages_copied"]


@pytest.mark.parametrize("select", ["block", "cacheblend"])
def test_full_recompute_leaves_the_exact_head_to_its_master(params, full_run, select):
  """At recompute 1.0 every reused token past the exact head is recomputed and none in it:
  the system prompt's master was computed after exactly the tokens before it (none), so
  recomputing it gives the same K/V and forks its pages for nothing. Outputs equal full."""
  _, got = run(params, "tokendance", ReusePolicy(select=select, recompute=1.0), rounds=2,
               quality=False)
  system = len(Workload().system)
  for r, res in enumerate(got):
    assert res.outputs == full_run[r].outputs, r
    shared = res.stats["shared_tokens_per_agent"]
    assert res.stats["shared_recomputed_per_agent"] == {a: n - system for a, n in shared.items()}, r


@pytest.mark.parametrize("method", ["full", "prefix", "cacheblend", "tokendance"])
def test_a_round_bigger_than_the_pool_runs_in_waves(params, method):
  """A pool that holds about two agents at once: the round is admitted in waves (reported in
  stats), gives the outputs of a pool that holds everything, and leaves nothing behind."""
  policy = ReusePolicy(recompute=0.3)
  _, roomy = run(params, method, policy, quality=False)
  small = CacheConfig(num_pages=40, page_size=8)
  sess = RoundSession(params, CFG, method=method, policy=policy, cache_cfg=small, quality=False)
  wl, prev, waves = Workload(), None, []
  for r in range(3):
    res = sess.run_round(wl.round(r, prev))
    assert res.outputs == roomy[r].outputs, f"round {r}"
    assert sum(res.stats["wave_sizes"]) == N_AGENTS
    waves.append(res.stats["waves"])
    prev = res.outputs
  assert max(waves) > 1
  sess.close()
  assert sess.allocator.num_used == 0


@pytest.mark.parametrize("method,sizes", [("prefix", range(16, 28, 2)),
                                          ("tokendance", range(22, 34, 2))])
def test_admission_never_overcommits_a_tight_pool(params, method, sizes):
  """From a pool that holds about one agent to one that holds two or three: every round is
  either refused up front (an agent that cannot fit alone) or runs in waves to the outputs of
  a roomy pool. A wave never runs out of pages midway, which it does when admission counts a
  cached page as room that an agent of the wave pins (prefix), or bounds an agent's forks too
  low (tokendance). One pool of 64 pages (one compile), of which all but n are held aside."""
  from tokendance_jax.paging import OutOfPages

  policy = ReusePolicy(recompute=0.3)
  _, roomy = run(params, method, policy, quality=False)
  for n in sizes:
    sess = RoundSession(params, CFG, method=method, policy=policy, quality=False,
                        cache_cfg=CacheConfig(num_pages=64, page_size=8))
    aside = sess.allocator.alloc(sess.allocator.num_free - n)
    wl, prev = Workload(), None
    try:
      for r in range(3):
        try:
          res = sess.run_round(wl.round(r, prev))
        except OutOfPages as e:
          assert "alone needs" in str(e), f"{n} pages, round {r}: {e}"
          break
        assert res.outputs == roomy[r].outputs, f"{n} pages, round {r}"
        prev = res.outputs
    finally:
      sess.close()
    sess.allocator.free(aside)
    assert sess.allocator.num_used == 0, n


def test_an_agent_too_big_for_the_pool_alone_is_named(params):
  from tokendance_jax.paging import OutOfPages

  sess = RoundSession(params, CFG, method="full", cache_cfg=CacheConfig(num_pages=8, page_size=8),
                      quality=False)
  with pytest.raises(OutOfPages, match="agent 'a0' alone needs"):
    sess.run_round(Workload().round(0, None))
  assert sess.allocator.num_used == 0
