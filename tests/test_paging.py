"""Page allocator and block tables: no leak, no double free, all-or-nothing allocation."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokendance_jax.paging import NULL_PAGE, BlockTable, OutOfPages, PageAllocator


def test_alloc_is_all_or_nothing():
  a = PageAllocator(5)
  got = a.alloc(3)
  assert NULL_PAGE not in got and len(set(got)) == 3
  with pytest.raises(OutOfPages) as e:
    a.alloc(2)
  assert e.value.requested == 2 and e.value.free == 1
  assert a.num_free == 1  # the failed call took nothing


def test_double_free_and_bad_pages_raise():
  a = PageAllocator(4)
  (p,) = a.alloc(1)
  a.free([p])
  with pytest.raises(ValueError, match="not allocated"):
    a.free([p])
  with pytest.raises(ValueError, match="out of range"):
    a.share([0])
  q, r = a.alloc(2)
  with pytest.raises(ValueError, match="double free"):
    a.free([q, q])
  assert a.refcount(q) == 1  # refused call changed nothing
  a.check_invariants()


def test_shared_page_lives_until_last_reference():
  a = PageAllocator(4)
  (p,) = a.alloc(1)
  a.share([p])
  assert a.free([p]) == []
  assert a.free([p]) == [p]
  a.check_invariants()


def test_block_table_grows_and_pads():
  a = PageAllocator(10)
  t = BlockTable(page_size=4)
  assert len(t.ensure(9, a)) == 3 and t.capacity() == 12
  assert t.ensure(12, a) == []
  row = t.as_row(6)
  assert list(row[3:]) == [NULL_PAGE] * 3
  with pytest.raises(ValueError, match="does not fit"):
    t.as_row(2)
  t.release(a)
  assert a.num_free == 9


ops = st.lists(
    st.tuples(st.sampled_from(["alloc", "share", "free", "free_table"]), st.integers(0, 6)),
    max_size=60)


@settings(max_examples=200, deadline=None)
@given(ops)
def test_random_sequences_never_leak_or_double_free(program):
  """Model the allocator with a multiset of held references and check it after each op."""
  a = PageAllocator(12)
  held: list[int] = []  # one entry per reference we own
  tables: list[BlockTable] = []
  for op, n in program:
    if op == "alloc":
      try:
        held += a.alloc(n)
      except OutOfPages:
        assert n > a.num_free
    elif op == "share" and held:
      pages = held[: n % len(held) + 1]
      a.share(pages)
      held += pages
    elif op == "free" and held:
      pages, held = held[:n], held[n:]
      a.free(pages)
    elif op == "free_table":
      t = BlockTable(page_size=2)
      try:
        t.ensure(n, a)
        tables.append(t)
      except OutOfPages:
        pass
      if len(tables) > 2:
        tables.pop(0).release(a)
    a.check_invariants()
    owned = set(held) | {p for t in tables for p in t.pages}
    assert a.num_used == len(owned)
    for p in owned:
      assert a.refcount(p) == held.count(p) + sum(t.pages.count(p) for t in tables)
  a.free(held)
  for t in tables:
    t.release(a)
  assert a.num_used == 0
  a.check_invariants()


def test_segments_start_on_fresh_pages_with_contiguous_positions():
  a = PageAllocator(16)
  t = BlockTable(page_size=4)
  t.append_segment(a.alloc(2), 5)  # positions 0..4 on two pages, the second holds 1 slot
  shared = a.alloc(1)
  a.share(shared)  # the table takes its own reference on a master page
  t.append_segment(shared, 3)  # positions 5..7
  t.ensure(14, a)  # open tail from position 8
  pages, starts, lens = t.rows(8)
  assert list(starts[:5]) == [0, 4, 5, 8, 12] and list(lens[:5]) == [4, 1, 3, 4, 4]
  assert lens[5:].tolist() == [0, 0, 0]
  assert t.slot(4) == pages[1] * 4 and t.slot(6) == shared[0] * 4 + 1
  assert t.slot(13) == pages[4] * 4 + 1
  with pytest.raises(IndexError):
    t.slot(16)
  with pytest.raises(ValueError, match="after an open tail"):
    t.append_segment(a.alloc(1), 2)
  t.release(a)
  assert a.refcount(shared[0]) == 1  # the master's own reference survives


def test_truncate_frees_only_the_blocks_after_the_kept_ones():
  alloc = PageAllocator(16)
  t = BlockTable(4)
  t.append_segment(alloc.alloc(2), 6)  # blocks 0-1: positions 0-5
  t.ensure(14, alloc)  # tail blocks from position 8
  assert len(t.pages) == 4 and alloc.num_used == 4
  kept = t.pages[:2]
  t.truncate(2, alloc)
  assert t.pages == kept and alloc.num_used == 2 and t.capacity() == 6 and t.end == 6
  assert t.ensure(10, alloc) and t.starts[2] == 6  # grows again from the kept blocks' end
  with pytest.raises(ValueError, match="num_blocks"):
    t.truncate(9, alloc)


def test_plan_waves_fills_each_wave_in_order_and_names_an_agent_that_cannot_fit():
  from tokendance_jax.admission import plan_waves

  assert plan_waves([3, 3, 3], 10) == [[0, 1, 2]]
  assert plan_waves([4, 4, 4, 1], 9) == [[0, 1], [2, 3]]
  assert plan_waves([9, 1], 9) == [[0], [1]]
  assert plan_waves([], 5) == []
  with pytest.raises(OutOfPages, match="'b' alone needs up to 7 pages and 6 are free"):
    plan_waves([2, 7], 6, names=["a", "b"])


def test_sharded_allocator_keeps_each_shard_in_its_range():
  a = PageAllocator(12, shards=3)  # shard s: pages 4s..4s+3, page 4s reserved
  assert (a.pages_per_shard, a.num_free, a.num_used) == (4, 9, 0)
  got = {s: a.alloc(3, s) for s in range(3)}
  assert got == {0: [1, 2, 3], 1: [5, 6, 7], 2: [9, 10, 11]}
  assert [a.shard_of(p) for p in (0, 3, 4, 11)] == [0, 0, 1, 2]
  a.free([6])
  assert (a.free_in(0), a.free_in(1), a.used_in(1)) == (0, 1, 2)
  with pytest.raises(OutOfPages, match=r"^shard 2: requested 1 pages, 0 free") as e:
    a.alloc(1, 2)  # shard 1 has a free page; shard 2 does not
  assert e.value.shard == 2
  assert a.alloc(1, 1) == [6]
  with pytest.raises(ValueError, match="reserved null page"):
    a.share([4])
  with pytest.raises(ValueError, match="shard 3 out of range"):
    a.alloc(1, 3)
  with pytest.raises(ValueError, match="split evenly"):
    PageAllocator(10, shards=3)
  a.check_invariants()


def test_sharded_allocator_asks_reclaimers_for_the_short_shard_and_round_trips():
  a = PageAllocator(8, shards=2)
  held = a.alloc(3, 1)
  asked = []

  def reclaim(n, shard):
    asked.append((n, shard))
    return len(a.free(held[:1]))

  a.add_reclaimer(reclaim)
  assert a.alloc(1, 1) == [held[0]]
  assert asked == [(1, 1)]
  a.alloc(2, 0)  # shard 0 has room: no reclaimer asked
  assert asked == [(1, 1)]
  b = PageAllocator(8, shards=2)
  b.load_state_dict(a.state_dict())
  assert [b.refcount(p) for p in range(8)] == [a.refcount(p) for p in range(8)]
  assert [b.free_in(s) for s in (0, 1)] == [1, 0]
  with pytest.raises(ValueError, match="2 shard"):
    PageAllocator(8).load_state_dict(a.state_dict())
  b.check_invariants()


def test_place_waves_balances_shards_and_prefers_the_shard_with_hits():
  from tokendance_jax.admission import place_waves
  # four agents of 3 pages on two shards of 6: two per shard, in one wave
  assert place_waves([[3] * 4, [3] * 4], [6, 6]) == [[(0, 0), (1, 1), (2, 0), (3, 1)]]
  # agent 1 needs less on shard 1 (a prefix-cache hit there): it goes there
  assert place_waves([[3, 3], [3, 1]], [6, 6]) == [[(0, 0), (1, 1)]]
  # a fifth agent does not fit the wave's shards: a new wave
  assert place_waves([[3] * 5, [3] * 5], [6, 6])[1] == [(4, 0)]
  with pytest.raises(OutOfPages, match=r"shard 1: .*agent 'b' alone needs up to 7 pages and 6 "
                                       r"are free on any of the 2 pool shards") as e:
    place_waves([[3, 8], [3, 7]], [6, 6], names=["a", "b"])
  assert e.value.shard == 1


def test_place_waves_charges_a_masters_replica_once_per_shard():
  from tokendance_jax.admission import place_waves
  # master "m" (3 pages) is on shard 0 only: the first reader on shard 1 pays its replica
  # once, the next ones only their own pages; pages balance, counting the replica
  reads, present = [{"m": 3}] * 7, [{"m"}, set()]
  got = place_waves([[2] * 7, [2] * 7], [10, 10], reads=reads, present=present)
  assert got == [[(0, 0), (1, 0), (2, 1), (3, 0), (4, 1), (5, 0), (6, 1)]]
  # the replica stays across waves: shard 1 has 10 - 3 pages for the next wave's agents
  waves = place_waves([[2] * 20, [2] * 20], [10, 10], reads=[{"m": 3}] * 20, present=present)
  assert [len(w) for w in waves] == [8, 8, 4]  # shard 1: 3 agents per wave, not 5
  assert sorted(d for _, d in waves[1]) == [0] * 5 + [1] * 3


def test_place_waves_charges_pinned_cached_pages_once_per_wave():
  from tokendance_jax.admission import place_waves
  # a cached page an agent's layout reuses cannot be reclaimed while its wave runs: the
  # wave pays for it once (agents 0 and 2 share pins 1..3), and the next wave pays again
  needs, pins = [[1, 5, 1, 6]], [[{1, 2, 3}, set(), {1, 2, 3}, set()]]
  assert place_waves(needs, [9], pins=pins) == [[(0, 0), (1, 0)], [(2, 0)], [(3, 0)]]
  # pins shared inside one wave are charged once: 3 pinned + 4 fresh pages
  assert place_waves([[1, 1, 1, 1]], [7], pins=[[{1, 2, 3}] * 4]) == [[(i, 0) for i in range(4)]]
  # pins count on their own shard: agent 1 would pin 4 pages on shard 1, so it joins agent
  # 0 on shard 0 (balance alone would put it on the empty shard 1)
  got = place_waves([[1, 1], [1, 1]], [6, 6], pins=[[set(), set()], [set(), {1, 2, 3, 4}]])
  assert got == [[(0, 0), (1, 0)]]
  with pytest.raises(OutOfPages, match="'a' alone needs up to 5 pages and 4 are free"):
    place_waves([[2]], [4], names=["a"], pins=[[{7, 8, 9}]])


def test_build_batch_puts_each_shards_chunks_in_its_slice():
  from tokendance_jax.batch import build_batch
  a = PageAllocator(16, shards=2)
  tables = [BlockTable(4, shard=s) for s in (1, 0, 1)]
  for t, n in zip(tables, (5, 3, 2), strict=True):
    t.ensure(n, a)
  chunks = [(t, list(range(10, 10 + n)), 0, n) for t, n in zip(tables, (5, 3, 2), strict=True)]
  batch, sampled, rows = build_batch(chunks, shards=2)
  assert rows == [2, 0, 3]  # shard 0's one chunk in rows 0..1, shard 1's two in rows 2..3
  t = batch.tokens.shape[0] // 2  # each slice bucketed to the larger (7 tokens -> 16)
  assert t == 16 and sampled == {0, 1, 2}
  assert list(batch.seq_ids[t:t + 7]) == [0] * 5 + [1] * 2  # rows local to the slice
  assert list(batch.positions[:4]) == [0, 1, 2, -1]
  assert all(a.shard_of(p) == 1 for p in batch.block_tables[2:4].ravel() if p)
  assert batch.logits_index[2] == t + 4 and batch.logits_index[0] == 2
  with pytest.raises(ValueError, match="shard 1; the pool has 1"):
    build_batch(chunks)
