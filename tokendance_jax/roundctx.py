"""What every stage of a round reads: the engine, the pool, the registries and the policy.

`RoundSession` builds one `RoundContext` and hands it to each stage
(`layout`, `master_prefill`, `collect`, `handover`) and to the method's
strategy (`methods`). The context owns no pages itself; it only names who
does: the engine's allocator counts every reference, the master registry
and the prefix cache hold theirs across rounds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

import jax
import numpy as np

from tokendance_jax import diffstore
from tokendance_jax.batch import bucket
from tokendance_jax.config import CacheConfig, ModelConfig
from tokendance_jax.engine import Engine
from tokendance_jax.paging import NULL_PAGE, PageAllocator
from tokendance_jax.prefix_cache import PrefixCache
from tokendance_jax.rounds import ReusePolicy
from tokendance_jax.sampling import SamplingParams

__all__ = ["RoundContext", "pad_pages"]


def pad_pages(pages, fill: int) -> np.ndarray:
  """Page ids padded to a bucketed length with `fill` (an out-of-range fill is dropped)."""
  out = np.full(bucket(len(pages), 8), fill, np.int32)
  out[:len(pages)] = pages
  return out


@dataclasses.dataclass
class RoundContext:
  """The shared state of a session's rounds (see the module docstring)."""

  engine: Engine
  cfg: ModelConfig
  cache_cfg: CacheConfig
  policy: ReusePolicy
  masters: diffstore.MasterRegistry
  prefix: PrefixCache | None
  sampling: SamplingParams
  want_logits: bool  # prefills return next-token log-probs (quality or keep_logprobs)
  progress: bool = False
  # (phase, t0, t1) perf_counter windows of the last round's prefill phases, for
  # profiling (benchmarks attribute compile time and FLOPs to them)
  timeline: list[tuple[str, float, float]] = dataclasses.field(default_factory=list)
  # each agent's own sampling parameters (a server's requests), instead of `sampling`
  agent_params: list[SamplingParams] | None = None

  @property
  def allocator(self) -> PageAllocator:
    return self.engine.allocator

  @property
  def page_size(self) -> int:
    return self.cache_cfg.page_size

  def sampling_for(self, i: int, max_tokens: int = 1) -> SamplingParams:
    """Agent i's sampling parameters: its own (`agent_params`), or the session's with a
    seed of its own."""
    if self.agent_params is not None:
      return self.agent_params[i]
    s = self.sampling
    return dataclasses.replace(s, max_tokens=max_tokens, seed=(s.seed + 7919 * i) % (1 << 32))

  def run(self, chunks, want_logits: bool):
    """`Engine.prefill` of chunks (table, tokens, positions), chunk i sampled per
    `sampling_for(i)`: (first tokens, log-probs [n, vocab] or None)."""
    return self.engine.prefill(chunks, want_logits,
                               [self.sampling_for(i) for i in range(len(chunks))])

  def copy(self, src: list[int], dst: list[int]) -> None:
    """Copy pages src[i] -> dst[i] in the KV cache, every layer."""
    if src:
      self.engine.copy_pages(pad_pages(src, NULL_PAGE), pad_pages(dst, self.cache_cfg.num_pages))

  def place_replicas(self, wanted) -> int:
    """A replica of each master `key` on `shard`, for each (key, shard) in `wanted` that has
    none: fresh pages there, copied from an existing replica in one device call. Returns
    the pages copied; on failure nothing new is held."""
    a, made = self.allocator, []
    try:
      for key, shard in dict.fromkeys(wanted):
        m = self.masters.masters[key]
        if shard not in m.replicas:
          made.append((key, shard, a.alloc(m.num_blocks, shard)))
    except BaseException:
      a.free([p for *_, pages in made for p in pages])
      raise
    src = [p for key, *_ in made for p in next(iter(self.masters.masters[key].replicas.values()))]
    self.copy(src, [p for *_, pages in made for p in pages])
    for key, shard, pages in made:
      self.masters.add_replica(key, shard, pages)
    return len(src)

  def master_shards(self) -> list[set[str]]:
    """The keys of the masters with a replica on each pool shard."""
    out = [set() for _ in range(self.allocator.shards)]
    for key, m in self.masters.masters.items():
      for shard in m.replicas:
        out[shard].add(key)
    return out

  def shard_for(self, keys) -> int:
    """The pool shard where a sequence reading masters `keys` is computed: the one holding
    most of them, then the one with the most free pages; replicas of the others are
    placed there."""
    a, have = self.allocator, self.master_shards()
    shard = max(range(a.shards), key=lambda d: (sum(k in have[d] for k in keys), a.free_in(d),
                                                -d))
    self.place_replicas([(k, shard) for k in keys])
    return shard

  def kept_pages(self) -> set[int]:
    """Pages the session holds across waves and rounds (masters, the prefix cache)."""
    kept = {p for m in self.masters.masters.values() for p in m.pages}
    if self.prefix is not None:
      kept.update(self.prefix.entries.values())
    return kept

  @contextlib.contextmanager
  def phase(self, stats: dict, name: str):
    """Time a prefill phase to the end of its device work: adds to stats[name_seconds],
    appends to `timeline`, and names the span in `jax.profiler` traces."""
    t0 = time.perf_counter()
    with jax.profiler.TraceAnnotation(f"tokendance/{name}"):
      yield
      jax.block_until_ready(self.engine.cache)
    t1 = time.perf_counter()
    stats[f"{name}_seconds"] += t1 - t0
    self.timeline.append((name, t0, t1))
