"""Automatic prefix caching in the engine: same greedy output as without it, fewer tokens
computed, and every page accounted for (tiny random model)."""

import jax
import numpy as np
import pytest

from tokendance_jax import model
from tokendance_jax.config import TINY, CacheConfig
from tokendance_jax.engine import Engine
from tokendance_jax.paging import BlockTable, PageAllocator
from tokendance_jax.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=6, ignore_eos=True)
PS = 16


@pytest.fixture(scope="module")
def params():
  return model.init_params(TINY, jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def system():
  return [int(t) for t in np.random.default_rng(1).integers(3, TINY.vocab_size, size=40)]


def _tail(seed: int, n: int = 5) -> list[int]:
  return [int(t) for t in np.random.default_rng(seed).integers(3, TINY.vocab_size, size=n)]


def _plain(params, prompts):
  cc = CacheConfig(num_pages=64, page_size=PS)
  return [Engine(params, TINY, cache_cfg=cc).generate([p], GREEDY)[0].output_ids
          for p in prompts]


def _run(eng: Engine, prompts):
  ids = [eng.add_request(p, GREEDY) for p in prompts]
  seqs = [eng.sequence(i) for i in ids]
  while eng.has_unfinished():
    eng.step()
  return [eng.pop_finished(i).output_ids for i in ids], [s.cached_tokens for s in seqs]


def test_second_request_reuses_the_shared_blocks(params, system):
  prompts = [system + _tail(2), system + _tail(3)]
  eng = Engine(params, TINY, cache_cfg=CacheConfig(num_pages=64, page_size=PS),
               prefix_caching=True)
  first, c1 = _run(eng, prompts[:1])
  second, c2 = _run(eng, prompts[1:])
  assert c1 == [0]
  assert c2 == [32]  # blocks 0 and 1 equal; block 2 holds positions 32..47, past the prefix
  assert first + second == _plain(params, prompts)


def test_requests_admitted_together_reuse_what_the_first_computes(params, system):
  """16-token prefill steps: the second sequence's first chunk waits for the first
  sequence's blocks and rematches before running."""
  prompts = [system + _tail(4), system + _tail(5), system + _tail(6)]
  eng = Engine(params, TINY, cache_cfg=CacheConfig(num_pages=64, page_size=PS),
               prefix_caching=True, max_prefill_tokens=16)
  got, cached = _run(eng, prompts)
  assert cached[0] == 0 and cached[1:] == [32, 32]
  assert got == _plain(params, prompts)


def test_prompt_of_whole_blocks_still_computes_its_last_token(params, system):
  p = system[:32]
  eng = Engine(params, TINY, cache_cfg=CacheConfig(num_pages=64, page_size=PS),
               prefix_caching=True)
  a, _ = _run(eng, [p])
  b, cached = _run(eng, [p])
  assert cached == [16]  # the block holding the last prompt token is computed again
  assert a == b == _plain(params, [p])


def test_only_the_cache_holds_pages_afterwards_and_clear_frees_them(params, system):
  eng = Engine(params, TINY, cache_cfg=CacheConfig(num_pages=64, page_size=PS),
               prefix_caching=True)
  _run(eng, [system + _tail(7), system + _tail(8)])
  assert eng.allocator.num_used == eng.prefix.num_pages > 0
  assert all(eng.allocator.refcount(p) == 1 for p in eng.prefix.entries.values())
  eng.prefix.clear()
  assert eng.allocator.num_used == 0
  eng.allocator.check_invariants()


def test_a_full_pool_evicts_cached_blocks_and_keeps_outputs(params):
  """9 usable pages of 16 slots; each request takes 3 pages and leaves 2 in the cache, so
  later requests need the cache to give pages back."""
  prompts = [_tail(10 + i, 40) for i in range(6)]
  eng = Engine(params, TINY, cache_cfg=CacheConfig(num_pages=10, page_size=PS),
               prefix_caching=True)
  got = [_run(eng, [p])[0][0] for p in prompts]
  assert got == _plain(params, prompts)
  assert eng.prefix.num_pages <= 9
  eng.allocator.check_invariants()


def test_preemption_with_cached_blocks_keeps_outputs(params, system):
  prompts = [system + _tail(20 + i) for i in range(4)]
  sp = SamplingParams(max_tokens=30, ignore_eos=True)
  expected = [Engine(params, TINY, cache_cfg=CacheConfig(num_pages=64, page_size=PS))
              .generate([p], sp)[0].output_ids for p in prompts]
  eng = Engine(params, TINY, cache_cfg=CacheConfig(num_pages=12, page_size=PS),
               prefix_caching=True, max_batch=4)
  got = [r.output_ids for r in eng.generate(prompts, sp)]
  assert eng.num_preemptions > 0
  assert got == expected
  eng.prefix.clear()
  assert eng.allocator.num_used == 0


def test_caching_a_long_generation_hashes_each_block_once(params, monkeypatch):
  """Each step that completes a block offers only that block to the cache, chained from the
  key of the block before it: 6 blocks cost 6 hashes (plus the 2 admission peeks of the
  prompt's one servable block), not 1 + 2 + ... + 6. The chain is the one a new request's
  lookup walks: its first 3 blocks hit."""
  from tokendance_jax import prefix_cache

  calls = []
  real = prefix_cache.chain_key
  monkeypatch.setattr(prefix_cache, "chain_key", lambda *a: calls.append(1) or real(*a))
  sp = SamplingParams(max_tokens=40, ignore_eos=True)
  eng = Engine(params, TINY, cache_cfg=CacheConfig(num_pages=64, page_size=8),
               prefix_caching=True)
  prompt = _tail(30, 9)
  out = eng.generate([prompt], sp)[0].output_ids
  assert eng.prefix.num_pages == 6  # 48 computed tokens: the 49th is sampled, not computed
  assert len(calls) == 6 + 2
  _, cached = _run(eng, [prompt + out[:16]])
  assert cached == [24]


def test_replace_pages_frees_the_old_pages():
  alloc = PageAllocator(8)
  t = BlockTable(4)
  t.ensure(12, alloc)
  old = list(t.pages)
  new = alloc.alloc(2)
  t.replace_pages(1, new, alloc)
  assert t.pages == [old[0], *new]
  assert alloc.refcount(old[1]) == alloc.refcount(old[2]) == 0
  with pytest.raises(ValueError, match="outside"):
    t.replace_pages(2, alloc.alloc(2), alloc)


def test_reclaimers_are_asked_in_order_until_enough_is_free():
  alloc = PageAllocator(5)
  held = alloc.alloc(4)
  asked = []

  spare = {"first": held[:1], "second": held[1:2]}  # each can free one page, once

  def reclaimer(name):
    def fn(n, shard):
      assert shard == 0
      asked.append((name, n))
      pages, spare[name] = spare[name], []
      return len(alloc.free(pages))
    return fn

  first, second = reclaimer("first"), reclaimer("second")

  alloc.add_reclaimer(first)
  alloc.add_reclaimer(second)
  alloc.alloc(1)
  assert asked == [("first", 1)]
  alloc.alloc(1)
  assert asked == [("first", 1), ("first", 1), ("second", 1)]
