"""Diff-aware storage: one master copy of each shared block, agents as mirrors.

A master is a run of pages holding a shared segment's K/V (keys before RoPE,
so any agent can hold it at any offset). An agent's block table is a mirror:
it lists the master's pages wherever its K/V equal the master's and its own
pages only where they differ (recomputed tokens, private segments). Nothing
dense is ever rebuilt: the attention kernels read the mirror's table.

The registry holds one page reference per master page; each mirror that
lists a page holds another, so a master lives until its last reader is gone.
On a pool sharded over devices a master has at most one replica per shard
(one copy per shard, not per agent), made when an agent on that shard first
reads it (`RoundContext.place_replicas`); an agent reads the replica on its
own shard.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tokendance_jax.paging import BlockTable, PageAllocator


@dataclasses.dataclass
class Master:
  key: str
  tokens: tuple[int, ...]
  replicas: dict[int, list[int]]  # pool shard -> the master's pages there
  # "context", "prefill" (standalone after the anchor), "decode" (an output) or "request" (a
  # chat's private chunk, served only after the same tokens: `implicit.ImplicitRounds`)
  source: str
  # segment_key of the tokens this master was computed after (None: unknown, e.g. decode).
  # A reader whose prompt holds exactly these tokens before the segment gets its K/V exactly.
  context: str | None = None

  @property
  def pages(self) -> list[int]:
    """Every page of every replica (what the registry holds references on)."""
    return [p for r in self.replicas.values() for p in r]

  @property
  def num_blocks(self) -> int:
    return len(next(iter(self.replicas.values())))

  def on(self, shard: int) -> list[int]:
    """The replica on `shard` (KeyError: none there yet)."""
    return self.replicas[shard]


class MasterRegistry:
  """Content hash -> master pages."""

  def __init__(self, allocator: PageAllocator):
    self.allocator = allocator
    self.masters: dict[str, Master] = {}

  def __contains__(self, key: str) -> bool:
    return key in self.masters

  def get(self, key: str) -> Master:
    self.masters[key] = self.masters.pop(key)  # most recently used last
    return self.masters[key]

  def add(self, key: str, tokens, pages: list[int], source: str,
          context: str | None = None) -> None:
    """Register pages (all on one pool shard: the master's first replica; the caller's
    references pass to the registry)."""
    shards = {self.allocator.shard_of(p) for p in pages}
    if len(shards) > 1:
      raise ValueError(f"master {key[:12]}: pages {pages} span shards {sorted(shards)}")
    if key in self.masters:
      self.allocator.free(pages)  # an identical block is already stored
      return
    shard = shards.pop() if shards else 0
    self.masters[key] = Master(key, tuple(tokens), {shard: list(pages)}, source, context)

  def add_replica(self, key: str, shard: int, pages: list[int]) -> None:
    """Register a copy of master `key` on `shard` (the caller's references pass on)."""
    m = self.masters[key]
    if shard in m.replicas or len(pages) != m.num_blocks or any(
        self.allocator.shard_of(p) != shard for p in pages):
      raise ValueError(f"master {key[:12]}: {pages} is not a new replica on shard {shard}")
    m.replicas[shard] = list(pages)

  def retain_only(self, keys) -> int:
    """Drop masters not in `keys`; returns how many were dropped."""
    drop = [k for k in self.masters if k not in keys]
    for k in drop:
      self.allocator.free(self.masters.pop(k).pages)
    return len(drop)

  def clear(self) -> None:
    self.retain_only(())

  def evict(self, needed: int, shard: int | None = None) -> int:
    """Free masters no table reads any more, least recently used first, until `needed`
    pages (of `shard`, or any) are free; returns those pages (an allocator `reclaim` hook).
    A master goes with all its replicas."""
    freed = 0
    for key in list(self.masters):
      if freed >= needed:
        break
      m = self.masters[key]
      if all(self.allocator.refcount(p) == 1 for p in m.pages):
        del self.masters[key]
        self.allocator.free(m.pages)
        freed += len(m.pages if shard is None else m.replicas.get(shard, []))
    return freed

  @property
  def num_pages(self) -> int:
    return sum(len(m.pages) for m in self.masters.values())


def output_master_pages(table: BlockTable, start: int, length: int) -> list[int] | None:
  """Pages holding positions [start, start + length) if they begin on a block boundary.

  An agent's generated output starts on a fresh block, so its pages can serve
  as the master of that output next round. Returns None when the layout does
  not allow it (after a preemption re-laid the sequence contiguously).
  """
  if length == 0 or start not in table.starts:
    return None
  j = table.starts.index(start)
  n = -(-length // table.page_size)
  if j + n > len(table.pages):
    return None
  return table.pages[j:j + n]


@dataclasses.dataclass(frozen=True)
class Footprint:
  """Pages per round, from the agents' block tables and the allocator."""

  pages_in_use: int  # every page the pool has handed out (masters, mirrors, caches)
  unique_pages: int  # distinct pages the agents' tables reference
  shared_region_pages: int  # distinct pages behind shared segments, across agents
  private_pages: int  # pages owned by one agent only (private segments, copies)
  mirror_pages: int  # agent-owned pages that replace a master block (copy-on-write)
  pages_in_use_per_shard: tuple[int, ...] = ()  # pages_in_use on each pool shard


def footprint(tables: list[BlockTable], shared_blocks: list[set[int]], mirror_blocks: list[set[int]],
              allocator: PageAllocator) -> Footprint:
  """Count pages; shared_blocks[i] / mirror_blocks[i] are block indices into tables[i]."""
  all_pages = [p for t in tables for p in t.pages]
  shared = {t.pages[j] for t, blocks in zip(tables, shared_blocks, strict=True) for j in blocks}
  counts = np.bincount(np.asarray(all_pages, np.int64), minlength=allocator.num_pages)
  own = sum(int(counts[p] == 1 and allocator.refcount(p) == 1) for p in set(all_pages))
  mirrors = sum(len(m) for m in mirror_blocks)
  return Footprint(pages_in_use=allocator.num_used, unique_pages=len(set(all_pages)),
                   pages_in_use_per_shard=tuple(allocator.used_in(d)
                                                for d in range(allocator.shards)),
                   shared_region_pages=len(shared), private_pages=own, mirror_pages=mirrors)


@dataclasses.dataclass(frozen=True)
class WaveFootprint:
  """One wave's `Footprint`, with the pages in it that outlive the wave (masters, cached
  pages), so waves admitted one after another can be counted as if resident at once."""

  footprint: Footprint
  kept_unique: frozenset[int]
  kept_shared: frozenset[int]


def wave_footprint(tables, shared_blocks, mirror_blocks, allocator: PageAllocator,
                   kept: set[int]) -> WaveFootprint:
  """`footprint` of one wave, remembering which of its pages are in `kept`."""
  fp = footprint(tables, shared_blocks, mirror_blocks, allocator)
  unique = {p for t in tables for p in t.pages}
  shared = {t.pages[j] for t, blocks in zip(tables, shared_blocks, strict=True) for j in blocks}
  return WaveFootprint(fp, frozenset(unique & kept), frozenset(shared & kept))


def combine_footprints(waves: list[WaveFootprint]) -> Footprint:
  """The round's footprint over waves: kept pages counted once, every wave's own pages added
  (their page ids are reused by later waves), pages_in_use the peak."""
  fps = [w.footprint for w in waves]
  kept_u = frozenset().union(*(w.kept_unique for w in waves))
  kept_s = frozenset().union(*(w.kept_shared for w in waves))
  return Footprint(
      pages_in_use=max(f.pages_in_use for f in fps),
      pages_in_use_per_shard=tuple(map(max, *(f.pages_in_use_per_shard for f in fps))),
      unique_pages=len(kept_u) + sum(f.unique_pages - len(w.kept_unique)
                                     for f, w in zip(fps, waves, strict=True)),
      shared_region_pages=len(kept_s) + sum(f.shared_region_pages - len(w.kept_shared)
                                            for f, w in zip(fps, waves, strict=True)),
      private_pages=sum(f.private_pages for f in fps),
      mirror_pages=sum(f.mirror_pages for f in fps))
