"""The KV Collector's selection and check, on hand-made inputs whose answer is known.

`select_tokens` must take the highest-deviation tokens (or pages) of each agent within
its budget, never a non-candidate, with ties going to the earlier token; the threshold
mode must take only what deviates more than tau relative to the key norm. `check_deviation`
must give exactly 0 for a master equal to what the agent computes, and rank a perturbed
key first.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokendance_jax import collector, model
from tokendance_jax.config import TINY, AttentionConfig, CacheConfig
from tokendance_jax.engine import build_batch
from tokendance_jax.paging import BlockTable


def select(dev, agent, budget, *, block=None, candidate=None, norm=None, tau=-1.0):
  """Indices chosen by `select_tokens` (by page when `block` is given, else by token)."""
  dev = np.asarray(dev, np.float32)
  t = dev.size
  agent = np.asarray(agent, np.int32)
  by_block = block is not None
  block = np.arange(t, dtype=np.int32) if block is None else np.asarray(block, np.int32)
  candidate = np.ones(t, bool) if candidate is None else np.asarray(candidate, bool)
  norm = np.ones(t, np.float32) if norm is None else np.asarray(norm, np.float32)
  mask = collector.select_tokens(dev, norm, agent, block, candidate,
                                 np.asarray(budget, np.int32), np.float32(tau),
                                 num_agents=len(budget), by_block=by_block)
  return np.flatnonzero(np.asarray(mask)).tolist()


def test_token_selection_takes_the_highest_deviations_per_agent():
  dev = [0.1, 0.9, 0.5, 0.3, 7.0, 0.2, 8.0, 6.0]
  agent = [0, 0, 0, 0, 1, 1, 1, 1]
  assert select(dev, agent, [2, 1]) == [1, 2, 6]
  assert select(dev, agent, [0, 3]) == [4, 6, 7]
  assert select(dev, agent, [4, 0]) == [0, 1, 2, 3]


def test_token_selection_never_takes_a_non_candidate():
  dev = [5.0, 0.1, 9.0, 0.2]
  mask = select(dev, [0, 0, 0, 0], [2], candidate=[True, True, False, True])
  assert mask == [0, 3]


def test_ties_go_to_the_earlier_token():
  assert select([1.0] * 6, [0, 0, 0, 1, 1, 1], [2, 1]) == [0, 1, 3]
  assert select([0.0] * 4, [0] * 4, [1]) == [0]


def test_block_selection_ranks_pages_by_summed_deviation_and_overshoots_at_most_one_page():
  # Agent 0: pages 0..2 of 4 tokens, sums 0.4 / 4.0 / 2.0. Agent 1: pages 3, 4, sums 1 / 3.
  dev = [0.1] * 4 + [1.0] * 4 + [0.5] * 4 + [0.25] * 4 + [0.75] * 4
  agent = [0] * 12 + [1] * 8
  block = np.repeat(np.arange(5), 4)
  assert select(dev, agent, [4, 1], block=block) == [*range(4, 8), *range(16, 20)]
  # A budget of 5 tokens covers one page and a part: the next page is taken whole, no more.
  assert select(dev, agent, [5, 0], block=block) == [*range(4, 12)]
  assert select(dev, agent, [0, 0], block=block) == []


def test_block_selection_counts_only_candidate_tokens_of_a_page():
  # Page 0 holds one huge non-candidate token and three small ones; page 1 is moderate.
  dev = [100.0, 0.1, 0.1, 0.1, 1.0, 1.0, 1.0, 1.0]
  cand = [False, True, True, True, True, True, True, True]
  block = [0, 0, 0, 0, 1, 1, 1, 1]
  assert select(dev, [0] * 8, [3], block=block, candidate=cand) == [4, 5, 6, 7]


def test_threshold_takes_only_what_deviates_more_than_tau_capped_by_the_budget():
  norm = [4.0] * 6
  dev = [0.01, 0.2, 0.5, 1.0, 0.02, 2.0]  # relative L2 = sqrt(dev / 4): .05 .22 .35 .5 .07 .71
  agent = [0] * 6
  assert select(dev, agent, [6], norm=norm, tau=0.3) == [2, 3, 5]
  assert select(dev, agent, [2], norm=norm, tau=0.3) == [3, 5]  # the cap keeps the highest
  assert select(dev, agent, [6], norm=norm, tau=0.8) == []
  assert select(dev, agent, [6], norm=norm, tau=0.0) == list(range(6))
  # Per page: summed deviation against summed norm.
  block = [0, 0, 1, 1, 2, 2]  # relative: sqrt(.21/8)=.16, sqrt(1.5/8)=.43, sqrt(2.02/8)=.50
  assert select(dev, agent, [6], block=block, norm=norm, tau=0.45) == [4, 5]
  assert select(dev, agent, [6], block=block, norm=norm, tau=0.2) == [2, 3, 4, 5]


# -- check_deviation ------------------------------------------------------------------------

CFG = dataclasses.replace(TINY, eos_ids=())
POOL = CacheConfig(num_pages=16, page_size=8)
ATTN = AttentionConfig(impl="reference")


@pytest.fixture(scope="module")
def params():
  return model.init_params(CFG, jax.random.PRNGKey(3))


def _prefill(params, tokens, pages):
  """Full prefill of `tokens` on `pages` of a fresh pool: (cache, table)."""
  table = BlockTable(POOL.page_size)
  table.append_segment(pages, len(tokens))
  batch, *_ = build_batch([(table, tokens, np.arange(len(tokens)))])
  _, cache = model.forward(params, model.KVCache.create(CFG, POOL), batch, cfg=CFG, attn=ATTN)
  return cache, table, batch


def _check(params, cache, table, tokens, check_layer=1):
  scratch_cfg = dataclasses.replace(POOL, num_pages=8)
  sub = dataclasses.replace(CFG, n_layers=check_layer + 1)
  scratch = model.KVCache.create(sub, scratch_cfg)
  fresh = BlockTable(POOL.page_size)
  fresh.append_segment(list(range(1, 1 + -(-len(tokens) // POOL.page_size))), len(tokens))
  batch, *_ = build_batch([(fresh, tokens, np.arange(len(tokens)))])
  reuse = np.full(batch.tokens.shape[0], -1, np.int32)
  reuse[:len(tokens)] = table.slots(0, len(tokens))
  dev, norm, _ = collector.check_deviation(params, scratch, cache.k[check_layer], batch, reuse,
                                           cfg=CFG, attn=ATTN, check_layer=check_layer)
  return np.asarray(dev)[:len(tokens)], np.asarray(norm)[:len(tokens)], np.asarray(dev)


def test_an_exact_master_has_zero_deviation(params):
  tokens = list(np.random.default_rng(0).integers(3, CFG.vocab_size, 20))
  cache, table, _ = _prefill(params, tokens, [5, 9, 7])  # master pages anywhere in the pool
  dev, norm, padded = _check(params, cache, table, tokens)
  np.testing.assert_array_equal(dev, 0.0)
  assert np.all(norm > 0)
  np.testing.assert_array_equal(padded[len(tokens):], 0.0)  # padding is never a candidate


def test_a_perturbed_key_ranks_first(params):
  tokens = list(np.random.default_rng(1).integers(3, CFG.vocab_size, 20))
  cache, table, _ = _prefill(params, tokens, [5, 9, 7])
  slot = table.slot(13)
  page, off = divmod(slot, POOL.page_size)
  k = cache.k.at[1, :, page, off].add(0.5)  # the check layer's key of position 13
  k = k.at[1, :, table.slot(3) // 8, 3].add(0.05)  # a smaller error at position 3
  dev, _, _ = _check(params, model.KVCache(k=k, v=cache.v), table, tokens)
  order = np.argsort(-dev, kind="stable")
  assert order[0] == 13 and order[1] == 3
  assert np.count_nonzero(dev) == 2
  # The master's keys at other layers are not compared: only the check layer's are.
  k0 = cache.k.at[0, :, page, off].add(0.5)
  dev0, _, _ = _check(params, model.KVCache(k=k0, v=cache.v), table, tokens)
  np.testing.assert_array_equal(dev0, 0.0)


def test_deviation_is_relative_to_the_reused_key_norm(params):
  tokens = list(np.random.default_rng(2).integers(3, CFG.vocab_size, 12))
  cache, table, _ = _prefill(params, tokens, [4, 6])
  page, off = divmod(table.slot(5), POOL.page_size)
  key = cache.k[1, :, page, off]
  k = cache.k.at[1, :, page, off].multiply(1.1)  # 10% relative error at position 5
  dev, norm, _ = _check(params, model.KVCache(k=k, v=cache.v), table, tokens)
  rel = np.sqrt(dev[5] / norm[5])
  np.testing.assert_allclose(rel, 0.1 / 1.1, rtol=1e-4)
  np.testing.assert_allclose(norm[5], float(jnp.sum(jnp.square(key * 1.1))), rtol=1e-5)


def test_deviation_profile_reports_relative_deviation_per_page_or_token():
  dev = np.array([0.0, 0.04, 1.0, 1.0, 9.0, 0.0])
  norm = np.array([1.0, 1.0, 4.0, 4.0, 9.0, 1.0])
  cand = np.array([True, True, True, True, True, False])
  tok = collector.deviation_profile(dev, norm, cand)
  assert tok["items"] == 5 and tok["exact"] == 1
  assert tok["max"] == pytest.approx(1.0) and tok["p50"] == pytest.approx(0.5)
  page = collector.deviation_profile(dev, norm, cand, block=np.array([0, 0, 1, 1, 2, 2]))
  assert page["items"] == 3 and page["exact"] == 0
  assert page["max"] == pytest.approx(1.0)  # page 2: 9 / 9 (the non-candidate does not count)
  assert page["p50"] == pytest.approx(0.5)  # page 1: sqrt(2 / 8)
  assert collector.deviation_profile(dev, norm, np.zeros(6, bool)) == {"items": 0}
