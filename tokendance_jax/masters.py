"""Where masters come from: the master-construction policies and their plans.

A master holds the K/V of one shared segment, computed once and read by every
agent whose prompt holds the segment (`diffstore`). How it is computed decides
how far the readers' reused K/V drift from what full recompute gives them:

- "context" (default): every shared segment of a round that lacks a master is
  prefilled in ONE sequence, in the order most prompts hold them, after the
  masters they follow (those are read through their pages, not recomputed).
  A master then has seen the other shared blocks that precede it in the
  readers' prompts; the segments every prompt starts with (the system prompt,
  the world state) are computed exactly as `full` computes them.
- "anchored": each missing segment prefilled on its own, right after the
  segment every prompt starts with (the system prompt).
- "decode": like "anchored", except that an agent's output reuses the K/V its
  author wrote while generating it (free, but computed in the author's own
  private context).

Prompts may disagree on the order of shared segments (per-agent random
order, `all_but_self` or k-random topologies). `consensus_order` picks one
order by pairwise majority; when the prompts' orders are all subsequences
of one order, every prompt's order is kept. This module holds the pure
planning; `session` runs the prefills.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from tokendance_jax.rounds import MASTERS, Round, Segment

__all__ = ["MASTERS", "MasterSequence", "common_prefix", "consensus_order", "context_plan",
           "shared_keys"]


def consensus_order(prompts: Sequence[Sequence[str]]) -> list[str]:
  """One order for the keys of many prompts (each a list of segment keys in prompt order).

  Key a goes before key b when more of the prompts holding both put a first
  (pairwise majority). Keys are emitted one at a time: among those with no
  remaining majority predecessor, the lowest mean position (index within the
  prompt) first, then the first seen; a majority cycle is broken the same way
  among all remaining keys. So when every prompt's order is a subsequence of
  one total order, every prompt's order is a subsequence of the result.
  """
  keys = list(dict.fromkeys(k for p in prompts for k in p))
  index = {k: i for i, k in enumerate(keys)}
  n = len(keys)
  before = np.zeros((n, n), np.int32)  # before[a, b]: prompts putting a ahead of b
  pos_sum, pos_count = np.zeros(n), np.zeros(n)
  for p in prompts:
    ids = np.array([index[k] for k in dict.fromkeys(p)], np.int64)
    if ids.size == 0:
      continue
    rank = np.arange(ids.size)
    before[np.ix_(ids, ids)] += (rank[:, None] < rank[None, :]).astype(np.int32)
    pos_sum[ids] += rank
    pos_count[ids] += 1
  majority = before > before.T  # majority[a, b]: a must come before b
  mean_pos = pos_sum / np.maximum(pos_count, 1)
  preds = majority.sum(axis=0)  # remaining majority predecessors of each key
  left = np.ones(n, bool)
  order = []
  for _ in range(n):
    ready = left & (preds == 0)
    pool = np.flatnonzero(ready if ready.any() else left)
    pick = int(pool[np.lexsort((pool, mean_pos[pool]))[0]])
    order.append(keys[pick])
    left[pick] = False
    preds -= majority[pick]
  return order


@dataclasses.dataclass(frozen=True)
class MasterSequence:
  """One prefill sequence of context masters.

  segments in sequence order; compute[i] is False where segments[i] already
  has a master (its pages are read as context, not recomputed).
  """

  segments: tuple[Segment, ...]
  compute: tuple[bool, ...]

  @property
  def num_tokens(self) -> int:
    return sum(len(s) for s in self.segments)


def shared_keys(rnd: Round) -> list[list[str]]:
  """Each prompt's shared segment keys, in prompt order."""
  return [[s.key for s in p.segments if s.shared] for p in rnd.prompts]


def common_prefix(rnd: Round) -> list[Segment]:
  """The leading shared segments every prompt of the round starts with (e.g. system, env)."""
  out = []
  for segs in zip(*(p.segments for p in rnd.prompts), strict=False):
    if not segs[0].shared or any(s.key != segs[0].key for s in segs):
      break
    out.append(segs[0])
  return out


def context_plan(rnd: Round, has_master: Callable[[str], bool],
                 max_len: int) -> list[MasterSequence]:
  """The sequences that make every missing master of `rnd` in context.

  The round's shared segments in `consensus_order`; a segment with a master is
  read (context), a segment without one is computed. A segment with a master that
  only one of the round's prompts holds is left out: it is no other reader's context.
  Read-only segments after the last computed one are dropped. When the sequence
  exceeds `max_len` tokens it is cut into windows that each restart after the
  round's common prefix (read from the first window's masters), so every position
  stays inside the model context. Empty when nothing is missing.
  """
  shared = rnd.shared_segments()
  keys = shared_keys(rnd)
  order = [shared[k] for k in consensus_order(keys)]
  head = common_prefix(rnd)
  head_keys = {s.key for s in head}
  head_len = sum(len(s) for s in head)
  holders = collections.Counter(k for p in keys for k in set(p))
  # a segment with a master that only one of several prompts holds (e.g. an agent's own
  # persona, read exactly) is context for that prompt alone: kept out of the sequence
  # whose masters the other prompts read, or its text would sit before them in theirs
  own = {s.key for s in order
         if len(rnd.prompts) > 1 and holders[s.key] == 1 and has_master(s.key)}
  rest = [s for s in order if s.key not in head_keys and s.key not in own]
  windows, cur = [], list(head)
  size = head_len
  for seg in rest:
    if size + len(seg) > max_len and len(cur) > len(head):
      windows.append(cur)
      cur, size = list(head), head_len
    if size + len(seg) > max_len:
      raise ValueError(f"shared segment {seg.name or seg.key!r} ({len(seg)} tokens) does not "
                       f"fit the model context {max_len} after the common prefix "
                       f"({head_len} tokens)")
    cur.append(seg)
    size += len(seg)
  windows.append(cur)
  plans, made = [], set()
  for w in windows:
    compute = [not has_master(s.key) and s.key not in made for s in w]
    while compute and not compute[-1]:
      compute.pop()
    if not compute:
      continue
    plans.append(MasterSequence(tuple(w[:len(compute)]), tuple(compute)))
    made.update(s.key for s, c in zip(w, compute, strict=False) if c)
  return plans
