"""Content-defined chunking: the same span gets the same chunks wherever it sits."""

import numpy as np
import pytest

from tokendance_jax.chunking import ChunkConfig, boundaries, chunk_spans

CFG = ChunkConfig(avg=32, min_len=16, max_len=256, window=4)


def _ids(seed, n):
  return [int(t) for t in np.random.default_rng(seed).integers(0, 49152, size=n)]


def _chunks(ids, cfg=CFG, cuts=()):
  return [tuple(ids[a:b]) for a, b in chunk_spans(ids, cfg, cuts)]


def _covered_inside(ids, span_start, span, cfg=CFG):
  """Chunks lying wholly inside ids[span_start:span_start + len(span)]."""
  stop = span_start + len(span)
  return [tuple(ids[a:b]) for a, b in chunk_spans(ids, cfg) if a >= span_start and b <= stop]


def test_chunks_partition_the_ids_and_respect_the_sizes():
  ids = _ids(0, 5000)
  spans = chunk_spans(ids, CFG)
  assert spans[0][0] == 0 and spans[-1][1] == len(ids)
  assert all(b == c for (_, b), (c, _) in zip(spans, spans[1:]))
  sizes = [b - a for a, b in spans]
  assert all(CFG.min_len <= s <= CFG.max_len for s in sizes[:-1])
  assert CFG.min_len < np.mean(sizes) < CFG.min_len + 3 * CFG.avg


def test_the_same_span_is_cut_the_same_at_any_offset():
  span = _ids(1, 400)
  seen = []
  for seed, lead in enumerate((0, 3, 17, 50, 111)):
    before, after = _ids(100 + seed, lead), _ids(200 + seed, 37)
    seen.append(_covered_inside(before + span + after, lead, span))
  common = set.intersection(*(set(c) for c in seen))
  assert sum(len(c) for c in common) >= 0.7 * len(span)


def test_forced_cuts_are_boundaries_and_restart_the_count():
  ids = _ids(2, 300)
  ends = boundaries(ids, CFG, cuts=(5, 100, 101))
  assert {5, 100, 101} <= set(ends)
  assert ends[-1] == 300 and ends == sorted(set(ends))
  spans = chunk_spans(ids, CFG, cuts=(5, 100, 101))
  inside = [s for s in spans if s[0] >= 101]
  assert all(b - a >= CFG.min_len for a, b in inside[:-1])


def test_a_span_between_cuts_gets_the_same_chunks_as_alone():
  span = _ids(3, 200)
  alone = _chunks(span)
  lead = _ids(4, 29)
  assert _chunks(lead + span + lead, cuts=(29, 229))[1:-1] == alone


def test_edges():
  assert boundaries([], CFG) == []
  assert boundaries([7, 8], CFG) == [2]
  assert chunk_spans(_ids(5, 3), CFG) == [(0, 3)]
  with pytest.raises(ValueError, match="min_len"):
    ChunkConfig(avg=32, min_len=2, max_len=64, window=4)
  with pytest.raises(ValueError, match="avg"):
    ChunkConfig(avg=1)


def test_no_sliver_before_a_forced_cut():
  """The piece before each forced cut joins the chunk before it when shorter than min_len,
  so a message is never cut into a chunk plus a few-token remainder."""
  ids = _ids(6, 4000)
  cuts = list(range(0, 4000, 97))[1:]  # regions of 97 tokens
  spans = chunk_spans(ids, CFG, cuts)
  assert set(cuts) <= {b for _, b in spans}
  assert all(b - a >= CFG.min_len for a, b in spans)
  short = ChunkConfig(avg=32, min_len=16, max_len=24, window=4)  # merging would pass max_len
  assert all(b - a <= short.max_len for a, b in chunk_spans(ids, short, cuts))
