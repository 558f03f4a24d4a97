"""The round's pure planning, on hand-made inputs (no model): selection, copy-on-write,
exact heads, batching and the methods' page bounds."""

from __future__ import annotations

import numpy as np
import pytest

from tokendance_jax import methods, selection
from tokendance_jax.diffstore import Master
from tokendance_jax.paging import BlockTable
from tokendance_jax.rounds import AgentPrompt, ReusePolicy, Segment, segment_key


def table(page_size, segments):
  """A BlockTable from (pages, length) per segment."""
  t = BlockTable(page_size)
  for pages, n in segments:
    t.append_segment(pages, n)
  return t


def test_copy_on_write_forks_only_touched_shared_blocks_and_copies_partial_ones():
  # positions 0-3 private (page 10), 4-11 shared on master pages 20, 21, then 12-14 shared (30)
  t = table(4, [([10], 4), ([20, 21], 8), ([30], 3)])
  shared = {1, 2, 3}
  sel = np.zeros(15, bool)
  sel[[0, 5]] = True  # a private token (never forked) and one token of block 1
  sel[8:12] = True  # all of block 2
  assert selection.copy_on_write_plan(t, sel, shared) == [(1, True), (2, False)]
  sel[:] = False
  assert selection.copy_on_write_plan(t, sel, shared) == []
  sel[12:15] = True  # a short last block, wholly selected: nothing to copy
  assert selection.copy_on_write_plan(t, sel, shared) == [(3, False)]


def test_copy_on_write_reads_blocks_through_the_table_not_positions():
  """Block 1 of the table sits on page 7; the plan names the block, found through its page."""
  t = table(2, [([5], 2), ([7, 9], 4)])
  sel = np.array([False, False, False, False, True, False])
  assert selection.copy_on_write_plan(t, sel, {1, 2}) == [(2, True)]


def test_exact_head_stops_at_the_first_master_computed_elsewhere():
  sys_, news, doc = Segment((1, 2), shared=True), Segment((3, 4, 5), shared=True), Segment(
      (6,), shared=True)
  spans = [(0, 0, sys_), (2, 1, news), (5, 2, doc), (6, 3, Segment((9,)))]
  tokens = [1, 2, 3, 4, 5, 6, 9]
  masters = {sys_.key: Master(sys_.key, sys_.tokens, [1], "context", segment_key(())),
             news.key: Master(news.key, news.tokens, [2], "context", segment_key((1, 2))),
             doc.key: Master(doc.key, doc.tokens, [3], "context", segment_key((1, 2, 7)))}
  assert selection.exact_head(spans, tokens, masters) == 5  # doc saw other tokens before it
  masters[news.key].context = None  # unknown context (a decode master): not exact
  assert selection.exact_head(spans, tokens, masters) == 2
  assert selection.exact_head(spans, tokens, {}) == 0


def test_token_groups_never_split_an_agent():
  assert selection.token_groups([3, 3, 3], 6) == [[0, 1], [2]]
  assert selection.token_groups([7, 1, 1], 6) == [[0], [1, 2]]
  assert selection.token_groups([2, 9, 2], 6) == [[0], [1], [2]]


def test_epic_selects_the_first_k_tokens_of_each_shared_segment():
  spans = [(0, 0, Segment((1, 2, 3))), (3, 1, Segment((4, 5, 6, 7), shared=True)),
           (7, 2, Segment((8,), shared=True))]
  sel = selection.epic_selection(spans, 8, k=2)
  assert sel.tolist() == [False, False, False, True, True, False, False, True]


def test_budget_and_the_admission_bound():
  assert selection.budget(10, 0.05) == 0 and selection.budget(30, 0.05) == 2
  prompt = AgentPrompt("a", [Segment(tuple(range(8))), Segment(tuple(range(40)), shared=True)])
  # token selection: 10% of 40 shared tokens is 4 tokens, so at most 4 of the 5 blocks fork
  token = ReusePolicy(select="cacheblend", recompute=0.1)
  assert selection.max_forked_blocks(prompt, token, 8) == 4
  # block selection: every block holds 8 >= 4 tokens, so the first one taken covers the budget
  assert selection.max_forked_blocks(prompt, ReusePolicy(recompute=0.1), 8) == 1
  assert selection.max_forked_blocks(prompt, ReusePolicy(recompute=1.0), 8) == 5
  assert selection.max_forked_blocks(prompt, ReusePolicy(recompute=0.0), 8) == 0
  assert selection.max_forked_blocks(prompt, ReusePolicy(select="epic", epic_k=3), 8) == 1
  # blocks of 3 | 5 | 8 8 4 | 8 1 tokens (37): 25% is 9 tokens; the smallest blocks 1+3+4 = 8
  # stay under it, so an order taking those first takes a fourth block before it stops
  odd = AgentPrompt("b", [Segment(tuple(range(3)), shared=True), Segment((7,) * 5, shared=True),
                          Segment((9,)), Segment(tuple(range(20)), shared=True),
                          Segment(tuple(range(9)), shared=True)])
  assert selection.max_forked_blocks(odd, ReusePolicy(recompute=0.25), 8) == 4
  assert selection.max_forked_blocks(odd, ReusePolicy(select="cacheblend", recompute=0.25),
                                     8) == 7


@pytest.mark.parametrize("select", ["block", "cacheblend"])
def test_selection_never_forks_more_blocks_than_the_admission_bound(select):
  """The bound against the device selection itself, under every kind of ranking: the smallest
  pages ranked first (the worst case, which block selection must reach), the largest first,
  and pages in random orders. Two agents wrote the same output, so one master (its pages) sits at
  two places of the prompt and a token selected on it forks both blocks."""
  from tokendance_jax import collector

  ps = 8
  segs = [Segment(tuple(range(n)), shared=True) for n in (3, 5, 20, 9, 13, 1)]
  segs.insert(3, segs[1])  # the 5-token output again
  prompt = AgentPrompt("a", segs)
  page_of, block_of, first, blocks = [], [], {}, 0  # per token: the master page, table block
  for seg in segs:
    first.setdefault(seg.key, 1 + max(page_of, default=-1))
    for j in range(len(seg)):
      page_of.append(first[seg.key] + j // ps)
      block_of.append(blocks + j // ps)
    blocks += -(-len(seg) // ps)
  page_of, block_of = np.array(page_of), np.array(block_of)
  assert block_of.max() + 1 == 11 and page_of.max() + 1 == 10  # 11 blocks on 10 pages
  sizes = np.bincount(page_of)
  t = len(page_of)
  rng = np.random.default_rng(0)
  for recompute in (0.05, 0.1, 0.25, 0.5, 0.9):
    policy = ReusePolicy(select=select, recompute=recompute)
    bound = selection.max_forked_blocks(prompt, policy, ps)
    budget = np.array([selection.budget(t, recompute)], np.int32)
    rankings = {"small first": 1.0 / sizes[page_of], "large first": sizes[page_of] * 1.0}
    rankings.update({f"random order {k}": rng.permutation(len(sizes))[page_of] + 1.0
                     for k in range(100)})
    forks = {}
    for name, dev in rankings.items():
      dev = (dev / sizes[page_of]).astype(np.float32)  # a page's score: its tokens' sum
      mask = np.asarray(collector.select_tokens(
          dev, np.ones(t, np.float32), np.zeros(t, np.int32), page_of.astype(np.int32),
          np.ones(t, bool), budget, np.float32(-1.0), num_agents=1, by_block=select == "block"))
      assert mask.sum() >= budget[0], (recompute, name)  # the budget is covered
      touched = np.isin(page_of, page_of[mask])
      forks[name] = len(np.unique(block_of[touched]))
      assert forks[name] <= bound, (recompute, name, forks[name], bound)
    if select == "block" and recompute < 0.5:
      assert forks["small first"] >= bound - 1, (recompute, forks)  # the bound is near tight


def test_every_method_name_has_a_strategy():
  from tokendance_jax.rounds import METHODS, REUSE_METHODS

  for name in METHODS:
    m, _ = methods.make_method(name, ReusePolicy())
    assert m.name == name and m.reuses_masters == (name in REUSE_METHODS)
  assert methods.make_method("epic", ReusePolicy())[1].select == "epic"
  with pytest.raises(ValueError, match="method cacheblend"):
    methods.make_method("cacheblend", ReusePolicy(select="epic"))
  with pytest.raises(ValueError, match="'magic'"):
    methods.make_method("magic", ReusePolicy())


class _Ctx:
  page_size = 8


def test_a_mirror_needs_no_pages_for_its_shared_blocks_only_its_forks():
  prompt = AgentPrompt("a", [Segment(tuple(range(16)), shared=True), Segment(tuple(range(5)))],
                       max_tokens=9)
  # 4 of 16 shared tokens: one block of 8 covers them, so at most 1 shared block forks
  policy = ReusePolicy(recompute=0.25)
  td, _ = methods.make_method("tokendance", policy)
  full, _ = methods.make_method("full", policy)
  cb, _ = methods.make_method("cacheblend", policy)
  # output 2 pages + private 1 page (+ 1 fork for tokendance, + shared 2 for dense layouts)
  assert td.page_needs([prompt], _Ctx()) == [4]
  assert full.page_needs([prompt], _Ctx()) == [5]
  assert cb.page_needs([prompt], _Ctx()) == [5]
  policy = ReusePolicy(recompute=0.0)  # no token selected: the mirror needs no fork
  td, _ = methods.make_method("tokendance", policy)
  assert td.page_needs([prompt], _Ctx()) == [3]
