"""Fault injection: a round that fails at any point leaves the pool as it found it.

The model step, `Engine.step`, the allocator and a prefill batch are made to
raise at chosen calls of a round, for every method. After each fault the
pool holds only what the session keeps on purpose (masters, prefix cache),
no sequence is left in the engine, the same round then runs and gives the
outputs of a clean session, and `close()` empties the pool.
"""

import dataclasses

import jax
import numpy as np
import pytest

from tokendance_jax import engine as engine_mod
from tokendance_jax import model, paging
from tokendance_jax.config import TINY, CacheConfig
from tokendance_jax.paging import OutOfPages
from tokendance_jax.rounds import AgentPrompt, ReusePolicy, Round, Segment
from tokendance_jax.session import METHODS, RoundSession

CFG = dataclasses.replace(TINY, eos_ids=())
POOL = CacheConfig(num_pages=160, page_size=8)
POLICY = ReusePolicy(recompute=0.3)


class Fault(RuntimeError):
  """The injected failure."""


@pytest.fixture(scope="module")
def params():
  return model.init_params(CFG, jax.random.PRNGKey(1))


def make_round(r: int, prev: dict | None) -> Round:
  rng = np.random.default_rng(7)
  system = Segment(tuple(rng.integers(3, CFG.vocab_size, 21)), True, "system")
  prompts = []
  for i in range(3):
    segs = [system, Segment(tuple(rng.integers(3, CFG.vocab_size, 9 + 5 * i)), False, "me")]
    segs += [Segment(tuple(prev[f"a{j}"]), True, f"out{j}") for j in range(3) if prev]
    segs.append(Segment((5, 6, 7 + i, 9 + r), False, "tail"))
    prompts.append(AgentPrompt(f"a{i}", segs, max_tokens=5 + i))
  return Round(prompts)


def kept_pages(sess: RoundSession) -> dict[int, int]:
  """References the session holds on purpose: one per master page, one per cached page."""
  refs: dict[int, int] = {}
  for m in sess.masters.masters.values():
    for p in m.pages:
      refs[p] = refs.get(p, 0) + 1
  if sess.prefix is not None:
    for p in sess.prefix.entries.values():
      refs[p] = refs.get(p, 0) + 1
  return refs


def assert_pool_holds_only_kept(sess: RoundSession) -> None:
  eng = sess.engine
  assert not eng.running and not eng.waiting and not eng.finished
  refs = kept_pages(sess)
  assert sess.allocator.num_used == len(refs)
  assert {p: sess.allocator.refcount(p) for p in refs} == refs
  sess.allocator.check_invariants()


@pytest.fixture(scope="module")
def clean(params):
  """Per method: round 0's outputs and round 1's outputs of a session without faults."""
  out = {}
  for method in METHODS:
    sess = RoundSession(params, CFG, method=method, policy=POLICY, cache_cfg=POOL, quality=False)
    r0 = sess.run_round(make_round(0, None)).outputs
    out[method] = (r0, sess.run_round(make_round(1, r0)).outputs)
    sess.close()
  return out


class CallCounter:
  """Wraps `obj.name`; raises `exc` on call number `fail_at` (1-based), counts calls."""

  def __init__(self, monkeypatch, obj, name, fail_at=None, exc=None):
    self.calls, self.fail_at, self.exc = 0, fail_at, exc or Fault("injected")
    inner = getattr(obj, name)

    def wrapped(*a, **k):
      self.calls += 1
      if self.calls == self.fail_at:
        raise self.exc
      return inner(*a, **k)

    monkeypatch.setattr(obj, name, wrapped)


POINTS = {
    # where: (object getter, attribute, exception raised)
    "model_step": (lambda s: engine_mod, "_model_step", Fault("model step")),
    "prefill_step": (lambda s: engine_mod, "_model_step_logits", Fault("prefill")),
    "engine_step": (lambda s: s.engine, "step", Fault("engine.step")),
    "alloc": (lambda s: s.allocator, "alloc", OutOfPages(1, 0)),
}


def count_calls(params, method, point, clean_r0) -> int:
  """A session after round 0 and the number of `point` calls its round 1 makes."""
  with pytest.MonkeyPatch.context() as mp:
    sess = RoundSession(params, CFG, method=method, policy=POLICY, cache_cfg=POOL, quality=False)
    sess.run_round(make_round(0, None))
    getter, name, _ = POINTS[point]
    counter = CallCounter(mp, getter(sess), name)
    sess.run_round(make_round(1, clean_r0))
    calls = counter.calls
  sess.close()
  return calls


@pytest.mark.parametrize("point", sorted(POINTS))
@pytest.mark.parametrize("method", METHODS)
def test_a_fault_anywhere_in_a_round_leaks_nothing(params, clean, method, point):
  r0, r1 = clean[method]
  total = count_calls(params, method, point, r0)
  assert total > 0, f"round 1 of {method} never calls {point}"
  # the first call, the last, and one in the middle (each a different stage of the round)
  for fail_at in sorted({1, (total + 1) // 2, total}):
    sess = RoundSession(params, CFG, method=method, policy=POLICY, cache_cfg=POOL, quality=False)
    assert sess.run_round(make_round(0, None)).outputs == r0
    getter, name, exc = POINTS[point]
    with pytest.MonkeyPatch.context() as mp:
      CallCounter(mp, getter(sess), name, fail_at, exc)
      try:
        recovered = sess.run_round(make_round(1, r0)).outputs
      except type(exc):
        recovered = None
    # only a decode step's allocation may be absorbed (by preempting a sequence); the
    # round must then give the clean outputs
    if recovered is not None:
      assert point == "alloc" and recovered == r1, f"{method}: {point} call {fail_at}"
    assert_pool_holds_only_kept(sess)
    assert sess.run_round(make_round(1, r0)).outputs == r1, (
        f"{method}: round 1 after a fault at {point} call {fail_at} differs from a clean run")
    assert_pool_holds_only_kept(sess)
    sess.close()
    assert sess.allocator.num_used == 0


def test_prefix_layout_that_runs_out_frees_the_hits_it_took(params, monkeypatch):
  """Prefix caching: the layout takes cached pages (hits) for a segment, then the fresh
  page for the rest of it cannot be had. The hits already taken are released too."""
  sess = RoundSession(params, CFG, method="prefix", cache_cfg=POOL, quality=False)
  sys_seg = Segment(tuple(range(3, 3 + 28)), True, "system")  # 4 pages: 3 full, 1 partial
  one = Round([AgentPrompt("a0", [sys_seg, Segment((40, 41), False, "t")], max_tokens=2)])
  sess.run_round(one)
  # the same system prompt: 3 hits, then the partial block's page is refused
  CallCounter(monkeypatch, sess.allocator, "alloc", 1, OutOfPages(1, 0))
  with pytest.raises(OutOfPages):
    sess.run_round(one)
  assert_pool_holds_only_kept(sess)
  sess.close()
  assert sess.allocator.num_used == 0


def test_anchored_master_prefill_that_fails_frees_its_pages(params, monkeypatch):
  """The anchored master policy prefills each missing segment after the system prompt; a
  failure in that prefill frees every page it took (nothing becomes a master)."""
  sess = RoundSession(params, CFG, method="tokendance", cache_cfg=POOL, quality=False,
                      policy=ReusePolicy(recompute=0.3, masters="anchored"))
  r0 = sess.run_round(make_round(0, None)).outputs
  CallCounter(monkeypatch, engine_mod, "_model_step_logits", 1, Fault("prefill"))
  with pytest.raises(Fault):
    sess.run_round(make_round(1, r0))
  assert_pool_holds_only_kept(sess)
  assert paging.NULL_PAGE not in kept_pages(sess)


class DonatedThenFails:
  """Stands in for a jitted step that takes the donated cache and then fails on the device:
  on call `fail_at` it deletes the cache's buffers and raises."""

  def __init__(self, monkeypatch, name: str, fail_at: int):
    self.calls, self.fail_at, inner = 0, fail_at, getattr(engine_mod, name)

    def step(params, cache, *a, **k):
      self.calls += 1
      if self.calls == self.fail_at:
        cache.k.delete()
        cache.v.delete()
        raise Fault("device fault after donation")
      return inner(params, cache, *a, **k)

    monkeypatch.setattr(engine_mod, name, step)


@pytest.mark.parametrize("step", ["_model_step_logits", "_model_step"])  # prefill, decode
@pytest.mark.parametrize("method", METHODS)
def test_a_step_that_loses_the_cache_resets_the_session(params, clean, method, step):
  """The engine gets a new, empty cache and says so (CacheLost); the session drops its masters
  and cached blocks (their pages hold zeros now), and its next round equals a new session's."""
  r0, _ = clean[method]
  sess = RoundSession(params, CFG, method=method, policy=POLICY, cache_cfg=POOL, quality=False)
  sess.run_round(make_round(0, None))
  with pytest.MonkeyPatch.context() as mp:
    fault = DonatedThenFails(mp, step, fail_at=1)
    with pytest.raises(engine_mod.CacheLost) as info:
      sess.run_round(make_round(1, r0))
  assert fault.calls == 1 and isinstance(info.value.__cause__, Fault)
  assert sess.engine.cache_epoch == 1 and not sess.engine.cache.k.is_deleted()
  assert_pool_holds_only_kept(sess)
  assert sess.allocator.num_used == 0 and not sess.masters.masters
  fresh = RoundSession(params, CFG, method=method, policy=POLICY, cache_cfg=POOL, quality=False)
  assert sess.run_round(make_round(1, r0)).outputs == fresh.run_round(make_round(1, r0)).outputs


def test_a_check_that_loses_its_scratch_cache_is_retried_on_a_new_one(params, clean):
  """The check donates the scratch cache; after a fault there the next round makes a new one."""
  from tokendance_jax import collector

  r0, r1 = clean["tokendance"]
  sess = RoundSession(params, CFG, method="tokendance", policy=POLICY, cache_cfg=POOL,
                      quality=False)
  sess.run_round(make_round(0, None))
  inner = collector.check_deviation

  def check(params_, scratch, *a, **k):
    scratch.k.delete()
    scratch.v.delete()
    raise Fault("device fault in the check")

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(collector, "check_deviation", check)
    with pytest.raises(Fault):
      sess.run_round(make_round(1, r0))
  assert collector.check_deviation is inner
  assert_pool_holds_only_kept(sess)
  assert sess.run_round(make_round(1, r0)).outputs == r1
