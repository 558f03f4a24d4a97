"""Continuous batching on a tiny random model: batching never changes greedy output."""

import dataclasses

import jax
import numpy as np
import pytest

from tokendance_jax import engine as engine_mod
from tokendance_jax import model
from tokendance_jax.config import TINY, CacheConfig
from tokendance_jax.engine import Engine
from tokendance_jax.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def params():
  return model.init_params(TINY, jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def prompts():
  rng = np.random.default_rng(0)
  return [list(rng.integers(3, TINY.vocab_size, size=n)) for n in (5, 40, 17, 70, 3, 9)]


@pytest.fixture(scope="module")
def one_at_a_time(params, prompts):
  cc = CacheConfig(num_pages=64, page_size=8)
  return [Engine(params, TINY, cache_cfg=cc).generate([p], GREEDY)[0].output_ids for p in prompts]


def test_batched_equals_one_at_a_time(params, prompts, one_at_a_time):
  """Chunked prefill (32-token chunks), sequences joining as others leave (max_batch 3)."""
  eng = Engine(params, TINY, cache_cfg=CacheConfig(num_pages=64, page_size=8), max_batch=3,
               max_prefill_tokens=32)
  got = [r.output_ids for r in eng.generate(prompts, GREEDY)]
  assert got == one_at_a_time
  assert eng.allocator.num_used == 0
  eng.allocator.check_invariants()


def test_preemption_keeps_outputs_and_frees_pages(params, prompts, one_at_a_time):
  """A pool too small for all sequences' growth forces preemption and recompute."""
  short = [p[:15] for p in prompts]
  cc = CacheConfig(num_pages=64, page_size=8)
  expected = [Engine(params, TINY, cache_cfg=cc).generate([p], GREEDY)[0].output_ids for p in short]
  eng = Engine(params, TINY, cache_cfg=CacheConfig(num_pages=13, page_size=8), max_batch=6)
  got = [r.output_ids for r in eng.generate(short, GREEDY)]
  assert eng.num_preemptions > 0
  assert got == expected
  assert eng.allocator.num_used == 0


def test_seeded_sampling_is_reproducible_and_batch_independent(params, prompts):
  sp = SamplingParams(max_tokens=8, temperature=0.9, top_k=40, top_p=0.9, seed=7, ignore_eos=True)
  a = Engine(params, TINY).generate(prompts, sp)
  b = Engine(params, TINY).generate(prompts[2:3], sp)
  assert a[2].output_ids == b[0].output_ids
  c = Engine(params, TINY).generate(prompts[2:3], dataclasses.replace(sp, seed=8))
  greedy = Engine(params, TINY).generate(prompts[2:3], dataclasses.replace(sp, temperature=0.0))
  assert len({tuple(x[0].output_ids) for x in (b, c, greedy)}) > 1


def test_top_k_one_is_greedy(params, prompts, one_at_a_time):
  sp = SamplingParams(max_tokens=10, temperature=1.5, top_k=1, seed=3, ignore_eos=True)
  got = Engine(params, TINY).generate(prompts[:2], sp)
  assert [r.output_ids for r in got] == one_at_a_time[:2]


def test_stops_on_eos_and_stop_tokens(params, prompts, one_at_a_time):
  first = one_at_a_time[0][0]
  eng = Engine(params, dataclasses.replace(TINY, eos_ids=(first,)))
  res = eng.generate([prompts[0]], SamplingParams(max_tokens=10))[0]
  assert res.output_ids == [first] and res.finish_reason == "stop"
  third = one_at_a_time[0][2]
  res = Engine(params, TINY).generate(
      [prompts[0]], SamplingParams(max_tokens=10, stop_token_ids=(third,), ignore_eos=True))[0]
  assert res.output_ids[-1] == third and res.finish_reason == "stop"
  assert len(res.output_ids) == one_at_a_time[0].index(third) + 1


@pytest.mark.parametrize("prompt,sp,match", [
    ([], GREEDY, "empty"),
    ([5, 10_000], GREEDY, "outside the vocabulary"),
    ([5] * 500, SamplingParams(max_tokens=100), "exceeds the model context"),
])
def test_bad_requests_raise_before_touching_pages(params, prompt, sp, match):
  eng = Engine(params, TINY)
  with pytest.raises(ValueError, match=match):
    eng.add_request(prompt, sp)
  assert not eng.has_unfinished() and eng.allocator.num_used == 0


def test_request_larger_than_pool_is_refused(params):
  eng = Engine(params, TINY, cache_cfg=CacheConfig(num_pages=4, page_size=8))
  with pytest.raises(ValueError, match="pages"):
    eng.add_request([5] * 30, GREEDY)


@pytest.mark.parametrize("kwargs", [dict(max_tokens=0), dict(temperature=-1.0), dict(top_p=0.0),
                                    dict(top_k=-2)])
def test_bad_sampling_params(kwargs):
  with pytest.raises(ValueError, match=next(iter(kwargs))):
    SamplingParams(**kwargs)


def test_steady_decode_does_not_recompile(params, prompts):
  eng = Engine(params, TINY, max_batch=4)
  sp = SamplingParams(max_tokens=40, ignore_eos=True)
  for p in prompts[:4]:
    eng.add_request(p[:20], sp)
  for _ in range(8):  # prefill, then the first decode steps compile
    eng.step()
  before = engine_mod._model_step._cache_size()
  for _ in range(20):
    eng.step()
  assert engine_mod._model_step._cache_size() == before


def test_bucket():
  assert [engine_mod.bucket(n, 4) for n in (1, 4, 5, 17)] == [4, 4, 8, 32]


def test_a_sequence_that_cannot_grow_alone_raises_out_of_pages(params):
  """The only running sequence needs a page while every other page is held outside the
  engine (e.g. masters): nothing can be preempted, so the step raises OutOfPages naming the
  sequence, never a ValueError from packing an empty batch (which the server reports as 400)."""
  from tokendance_jax.paging import OutOfPages

  cc = CacheConfig(num_pages=8, page_size=8)
  eng = Engine(params, TINY, cache_cfg=cc)
  held = eng.allocator.alloc(5)  # the prompt's 8 tokens take 1 page; 1 left for growth
  sid = eng.add_request(list(range(3, 11)), SamplingParams(max_tokens=20, ignore_eos=True))
  with pytest.raises(OutOfPages, match=f"sequence {sid}"):
    for _ in range(40):
      eng.step()
  eng.allocator.free(held)


def _prefilled_table(eng, prompt):
  """A block table holding `prompt`'s K/V, computed by one prefill: its first token too."""
  from tokendance_jax.paging import BlockTable

  table = BlockTable(eng.cache_cfg.page_size)
  table.ensure(len(prompt), eng.allocator)
  first, _ = eng.prefill([(table, prompt, np.arange(len(prompt)))])
  return table, first[0]


def test_preempting_an_adopted_sequence_keeps_its_prompt_pages(params, prompts):
  """An adopted sequence (a round's mirror) is preempted by giving back only the pages of
  its generated tokens: the prompt's pages (master pages it shares) stay in its table, its
  generated tokens are recomputed over them, and its output equals an unpreempted run. Re-laying
  it out densely would quietly turn the agent into `full`."""
  prompt = [int(t) for t in prompts[3]]  # 70 tokens: 9 pages
  params_a = SamplingParams(max_tokens=30, ignore_eos=True)

  def run(num_pages):
    eng = Engine(params, TINY, cache_cfg=CacheConfig(num_pages=num_pages, page_size=8))
    table, first = _prefilled_table(eng, prompt)
    prompt_pages = list(table.pages)
    other = eng.add_request(prompts[1], SamplingParams(max_tokens=40, ignore_eos=True))
    eng.step()  # `other` runs first, so the adopted sequence is the newest: the one preempted
    seq = eng.adopt(prompt, table, first, params_a)
    while eng.has_unfinished():
      eng.step()
    eng.pop_finished(other)
    assert seq.table.pages[:len(prompt_pages)] == prompt_pages
    out = eng.pop_finished(seq.seq_id).output_ids
    seq.table.release(eng.allocator)
    assert eng.allocator.num_used == 0
    return out, eng.num_preemptions

  roomy, n0 = run(64)
  tight, n1 = run(22)
  assert n0 == 0 and n1 > 0
  assert tight == roomy


def test_a_step_that_loses_the_donated_cache_starts_over_on_an_empty_pool(params, prompts,
                                                                          one_at_a_time,
                                                                          monkeypatch):
  """A device fault after the step took the cache: the engine raises CacheLost naming the
  aborted sequences, frees their pages, gets a new cache, and then serves as before."""
  eng = Engine(params, TINY, cache_cfg=CacheConfig(num_pages=64, page_size=8))
  ids = [eng.add_request(p, GREEDY) for p in prompts[:3]]
  inner, calls = engine_mod._model_step, []

  def step(params_, cache, *a, **k):
    calls.append(1)
    if len(calls) == 3:  # a decode step, with every sequence holding pages
      cache.k.delete()
      cache.v.delete()
      raise RuntimeError("device fault")
    return inner(params_, cache, *a, **k)

  monkeypatch.setattr(engine_mod, "_model_step", step)
  with pytest.raises(engine_mod.CacheLost, match="3 sequences") as info:
    while eng.has_unfinished():
      eng.step()
  assert sorted(info.value.seq_ids) == sorted(ids)
  assert not eng.running and not eng.waiting and eng.allocator.num_used == 0
  assert eng.cache_epoch == 1 and not eng.cache.k.is_deleted()
  monkeypatch.setattr(engine_mod, "_model_step", inner)
  assert [r.output_ids for r in eng.generate(prompts[:3], GREEDY)] == one_at_a_time[:3]
