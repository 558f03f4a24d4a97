"""Multi-agent rounds on one paged pool, with TokenDance and the baselines side by side.

`RoundSession.run_round` takes a round through its stages, top to bottom
(docs/architecture.md has the table of stages and the state each owns):

1. resolve and validate the round (`rounds`);
2. masters for the shared segments that have none (`master_prefill`);
3. admission: the agents in waves that fit the pool (`admission`);
4. per wave: layout (`layout`), prefill by the method (`methods`; for the
   reuse methods the KV Collector's check, select, copy-on-write and
   recompute, `collect`), decode and hand-over (`handover`).

The methods (`full`, `prefix`, `cacheblend` / `epic`, `tokendance`) are
strategies (`methods.make_method`). Each stage frees what it took if it
fails, so a failed round leaves the pool as it found it, less the masters it
made.
"""

from __future__ import annotations

import dataclasses
import time

import jax.numpy as jnp
import numpy as np

from tokendance_jax import admission, diffstore, handover
from tokendance_jax.collect import Collector
from tokendance_jax.config import AttentionConfig, CacheConfig, ModelConfig
from tokendance_jax.engine import CacheLost, Engine
from tokendance_jax.eval.quality import next_token_quality
from tokendance_jax.layout import AgentState, layout_wave, release
from tokendance_jax.master_prefill import MasterBuilder
from tokendance_jax.methods import make_method
from tokendance_jax.paging import BlockTable, OutOfPages, pages_needed
from tokendance_jax.prefix_cache import PrefixCache
from tokendance_jax.roundctx import RoundContext
from tokendance_jax.rounds import METHODS, REUSE_METHODS, ReusePolicy, Round, Segment
from tokendance_jax.roundstats import device_stats, new_stats, token_stats
from tokendance_jax.sampling import SamplingParams

__all__ = ["METHODS", "REUSE_METHODS", "AgentState", "RoundResult", "RoundSession",
           "new_stats"]


@dataclasses.dataclass
class RoundResult:
  round: int
  prefill_seconds: float
  round_seconds: float
  kv_bytes_per_agent: float
  shared_kv_bytes_per_agent: float
  pages_in_use: int
  outputs: dict[str, list[int]]
  output_keys: dict[str, str]  # segment id of each output, for SegmentRef in the next round
  quality: dict | None
  stats: dict
  # {agent: [vocab] float32} next-token log-probs at each prompt's end (keep_logprobs)
  logprobs: dict[str, np.ndarray] | None = None

  def to_json(self) -> dict:
    out = dataclasses.asdict(dataclasses.replace(self, logprobs=None))
    del out["logprobs"]
    if self.quality is None:
      del out["quality"]
    return out


class RoundSession:
  """Runs rounds for one method, keeping masters / prefix cache across rounds.

  Args:
    params, cfg: the model.
    method: one of METHODS.
    policy: reuse policy (selection, recompute fraction, check layer).
    cache_cfg: the page pool.
    attn: attention implementation (default: per backend).
    sampling: temperature / top-k / top-p / seed for every agent (greedy by default).
    quality: also prefill each round with `full` (untimed) and compare next-token distributions.
    keep_logprobs: return each agent's next-token log-probs at its prompt's end
      (`RoundResult.logprobs`), for a caller that compares them with a reference of its own.
    max_prefill_tokens: tokens per prefill / recompute batch.
    keep_masters: keep masters a round does not use (evicted least recently used
      when the pool runs short) instead of dropping them; for request streams
      (chat) where a shared segment comes back after rounds without it.
    mesh: None (one device) or a mesh / spec / `sharding.MeshPlan` (see `Engine`).
    engine: run on this engine's pool and scheduler instead of an engine of its own (a
      server's: its requests and the session's agents then share one page pool);
      `cache_cfg`, `attn`, `max_prefill_tokens` and `mesh` are the engine's.
  """

  def __init__(self, params, cfg: ModelConfig, *, method: str = "tokendance",
               policy: ReusePolicy = ReusePolicy(), cache_cfg: CacheConfig = CacheConfig(),
               attn: AttentionConfig | None = None, sampling: SamplingParams = SamplingParams(),
               quality: bool = True, max_prefill_tokens: int = 4096, progress: bool = False,
               mesh=None, keep_masters: bool = False, keep_logprobs: bool = False,
               engine: Engine | None = None):
    self.strategy, policy = make_method(method, policy)
    if policy.check_layer >= cfg.n_layers:
      raise ValueError(f"check_layer={policy.check_layer} must be < n_layers={cfg.n_layers}")
    if engine is None:
      engine = Engine(params, cfg, cache_cfg=cache_cfg, attn=attn, max_batch=1 << 20,
                      max_prefill_tokens=max_prefill_tokens, mesh=mesh)
    cache_cfg = engine.cache_cfg
    self.cfg, self.method, self.policy, self.cache_cfg = cfg, method, policy, cache_cfg
    self.engine = engine
    self.params = self.engine.params  # placed on the mesh when there is one
    self.attn, self.allocator = self.engine.attn, self.engine.allocator
    self.masters = diffstore.MasterRegistry(self.allocator)
    self.keep_masters, self.keep_logprobs, self.quality = keep_masters, keep_logprobs, quality
    if keep_masters:
      self.allocator.add_reclaimer(self.masters.evict)
    self.prefix = PrefixCache(self.allocator) if method == "prefix" else None
    self.ctx = RoundContext(self.engine, cfg, cache_cfg, policy, self.masters, self.prefix,
                            sampling, want_logits=quality or keep_logprobs, progress=progress)
    self.builder = MasterBuilder(self.ctx, keep_masters)
    self.collector = Collector(self.ctx)
    self.page_bytes = cache_cfg.bytes_per_page(cfg)
    self.round_index = 0
    self.known: dict[str, tuple[int, ...]] = {}  # key -> tokens of every shared segment seen

  @property
  def sampling(self) -> SamplingParams:
    """Temperature / top-k / top-p / seed for every agent of the next rounds."""
    return self.ctx.sampling

  @sampling.setter
  def sampling(self, params: SamplingParams) -> None:
    self.ctx.sampling = params

  @property
  def timeline(self) -> list[tuple[str, float, float]]:
    """(phase, t0, t1) perf_counter windows of the last round's prefill phases."""
    return self.ctx.timeline

  def run_round(self, rnd: Round) -> RoundResult:
    """Prefill (per method), decode every agent, keep what the next round reuses.

    Bad input (see `Round.validate`, unknown `SegmentRef`) raises ValueError
    before any page is touched. If a step loses the KV cache (`engine.CacheLost`),
    the masters and the prefix cache are dropped too; the next round starts from an
    empty pool.
    """
    try:
      return self._run_round(rnd)
    except CacheLost:  # the masters' and cached blocks' pages hold zeros now
      self.close()
      raise
    finally:
      self.builder.unpin()

  def close(self) -> None:
    """Free masters and cached pages; the pool is empty afterwards."""
    self.masters.clear()
    if self.prefix is not None:
      self.prefix.clear()

  def prefill_wave(self, rnd: Round, params: list[SamplingParams]):
    """Stages 1-7 for the first wave of `rnd` that fits the pool, without decode.

    For a caller that decodes in the engine itself (the server's implicit rounds):
    it adopts each agent (`Engine.adopt`) and releases its table when done
    (`layout.release`). `params` are the agents' own sampling parameters. Returns
    (indices of the admitted prompts, their `AgentState`s, first tokens, stats).
    Bad input raises ValueError; an agent that cannot fit alone, OutOfPages.
    Only masters made here outlive a failure.
    """
    try:
      rnd = rnd.resolve(self.known)
      rnd.validate(self.cfg)
      stats = new_stats()
      self.ctx.timeline = []
      if self.strategy.reuses_masters:
        self.builder.build(rnd, stats)
      placed = self._plan_waves(rnd)[0]
      wave = [i for i, _ in placed]
      self.ctx.agent_params = [params[i] for i in wave]
      agents = layout_wave([rnd.prompts[i] for i in wave], self.strategy, self.ctx,
                           [d for _, d in placed])
      try:
        first, _ = self.strategy.prefill(agents, self.ctx, self.collector, stats)
      except BaseException:
        release(agents, self.allocator)
        raise
      return wave, agents, first, stats
    except CacheLost:
      self.close()
      raise
    finally:
      self.builder.unpin()
      self.ctx.agent_params = None

  def _run_round(self, rnd: Round) -> RoundResult:
    rnd = rnd.resolve(self.known)  # stage 1
    rnd.validate(self.cfg)
    self.known.update((k, s.tokens) for k, s in rnd.shared_segments().items())
    stats = new_stats()
    self.ctx.timeline = []
    start = time.perf_counter()
    if self.strategy.reuses_masters:  # stage 2
      if not self.keep_masters:
        self.masters.retain_only(rnd.shared_segments().keys())
      self.builder.build(rnd, stats)
    prefill_seconds = time.perf_counter() - start
    agents, outputs, logprobs, fps = [], {}, [], []
    waves = self._plan_waves(rnd)  # stage 3
    for wave in waves:  # stages 4-9
      t0 = time.perf_counter()
      wave_agents, wave_out, lp, fp, wave_prefill = self._run_wave(
          [rnd.prompts[i] for i, _ in wave], [d for _, d in wave], stats, t0)
      prefill_seconds += wave_prefill
      agents += wave_agents
      outputs.update(wave_out)
      logprobs.append(lp)
      fps.append(fp)
    fp = fps[0].footprint if len(fps) == 1 else diffstore.combine_footprints(fps)
    logprobs = (jnp.concatenate(logprobs) if len(logprobs) > 1 else logprobs[0]) \
        if self.ctx.want_logits else None
    stats.update(waves=len(waves), wave_sizes=[len(w) for w in waves])
    output_keys = {}
    for agent_id, ids in outputs.items():
      if ids:
        output_keys[agent_id] = Segment(tuple(ids), shared=True).key
        self.known[output_keys[agent_id]] = tuple(ids)
    round_seconds = time.perf_counter() - start
    quality = self._quality(rnd, logprobs) if self.quality and self.method != "full" else None
    stats.update(token_stats(agents, self.cfg), **dataclasses.asdict(fp),
                 masters=len(self.masters.masters), master_pages=self.masters.num_pages,
                 preemptions=self.engine.num_preemptions)
    if self.engine.mesh_plan is not None:
      stats.update(device_stats(self.engine, fp, self.page_bytes,
                                list(self.masters.masters.values())))
    n = len(agents)
    result = RoundResult(
        round=self.round_index, prefill_seconds=prefill_seconds, round_seconds=round_seconds,
        kv_bytes_per_agent=fp.unique_pages * self.page_bytes / n,
        shared_kv_bytes_per_agent=fp.shared_region_pages * self.page_bytes / n,
        pages_in_use=fp.pages_in_use, outputs=outputs, output_keys=output_keys, quality=quality,
        stats=stats)
    if self.keep_logprobs:
      lp = np.asarray(logprobs)
      result.logprobs = {a.agent_id: lp[i] for i, a in enumerate(agents)}
    self.round_index += 1
    return result

  def _plan_waves(self, rnd: Round) -> list[list[tuple[int, int]]]:
    """The round's agents in waves of (agent, pool shard) that fit the pool
    (`admission.place_waves`), from the method's upper bound on each agent's pages on each
    shard and the cached pages it would pin (`Method.admission`)."""
    a, evictable = self.allocator, set()
    for cache in (self.prefix, self.engine.prefix):  # the engine's, when it is shared
      if cache is not None:
        evictable.update(p for p in cache.entries.values() if a.refcount(p) == 1)
    if self.keep_masters:
      evictable.update(p for m in self.masters.masters.values()
                       if all(a.refcount(q) == 1 for q in m.pages) for p in m.pages)
    bounds = [self.strategy.admission(rnd.prompts, self.ctx, d) for d in range(a.shards)]
    needs = [[need for need, _ in b] for b in bounds]
    room = [a.free_in(d) + sum(a.shard_of(p) == d for p in evictable) for d in range(a.shards)]
    # a reclaimable page an agent's layout reuses is room only for the waves without it
    pins = [[hits & evictable for _, hits in b] for b in bounds]
    reads = present = None
    if self.strategy.reuses_masters and a.shards > 1:  # replicas a shard's agents need there
      reg = self.masters.masters
      reads = [{s.key: reg[s.key].num_blocks for s in p.segments if s.shared and s.key in reg}
               for p in rnd.prompts]
      present = self.ctx.master_shards()
    return admission.place_waves(needs, room, [p.agent_id for p in rnd.prompts], reads, present,
                                 pins)

  def _run_wave(self, prompts, shards: list[int], stats: dict, start: float):
    """Lay out (each agent on its pool shard), prefill, decode and hand over one wave of
    agents. Returns (agents, outputs, log-probs or None, footprint after prefill, prefill
    seconds). On failure the wave's sequences are aborted and its pages released."""
    agents = layout_wave(prompts, self.strategy, self.ctx, shards)
    seqs: list = []  # the engine sequences adopted for decode
    try:
      first, logprobs = self.strategy.prefill(agents, self.ctx, self.collector, stats)
      prefill_seconds = time.perf_counter() - start
      fp = diffstore.wave_footprint([a.table for a in agents],
                                    [a.shared_blocks() for a in agents],
                                    [a.mirror_blocks for a in agents], self.allocator,
                                    self.ctx.kept_pages())
      outputs = handover.decode(self.ctx, agents, first, seqs)
      handover.finish(self.ctx, self.strategy, agents, outputs)
    except BaseException:  # leave the pool as the round found it, less the masters it made
      for s in seqs:
        self.engine.abort(s.seq_id)
      release(agents, self.allocator)
      raise
    return agents, outputs, logprobs, fp, prefill_seconds

  def _quality(self, rnd: Round, logprobs) -> dict:
    """Next-token agreement with `full` on the same prompts (untimed)."""
    tables = []
    a = self.allocator
    try:
      for i, p in enumerate(rnd.prompts):
        t = BlockTable(self.cache_cfg.page_size, shard=i % a.shards)
        for seg in p.segments:
          t.append_segment(a.alloc(pages_needed(len(seg), t.page_size), t.shard), len(seg))
        tables.append(t)
      chunks = [(t, p.tokens, np.arange(p.num_tokens))
                for t, p in zip(tables, rnd.prompts, strict=True)]
      _, ref = self.ctx.run(chunks, want_logits=True)
    except OutOfPages:
      return {"skipped": "pool too small for the reference prefill"}
    finally:
      for t in tables:
        t.release(self.allocator)
    return next_token_quality(ref, logprobs)
