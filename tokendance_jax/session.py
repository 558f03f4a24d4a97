"""Multi-agent rounds on one paged pool, with TokenDance and the baselines side by side.

Methods (same engine, same kernels, same pool):

- `full`: every agent prefills its whole prompt.
- `prefix`: vLLM-style automatic prefix caching across agents and rounds.
- `cacheblend` / `epic`: per-request position-independent caching, agent by
  agent: a dense copy of every reused block in the agent's own pages, then
  check and selective recompute for that agent alone.
- `tokendance`: the KV Collector: one batched check, one batched selection
  and one batched recompute for all agents of the round; agents are mirrors
  of the masters (diff-aware storage), with own pages only where they differ.

Every prompt is laid out segment by segment, each segment on fresh pages and
positions contiguous, so a shared segment's pages can be listed in any
agent's block table at that agent's offset.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from tokendance_jax import admission, collector, diffstore, masters, model, sharding
from tokendance_jax.eval.quality import next_token_quality
from tokendance_jax.config import AttentionConfig, CacheConfig, ModelConfig
from tokendance_jax.engine import Engine, bucket, build_batch
from tokendance_jax.paging import BlockTable, OutOfPages, pages_needed
from tokendance_jax.prefix_cache import PrefixCache
from tokendance_jax.progress import bar as progress_bar
from tokendance_jax.rounds import METHODS, REUSE_METHODS, ReusePolicy, Round, Segment, segment_key
from tokendance_jax.sampling import SamplingParams

__all__ = ["METHODS", "REUSE_METHODS", "AgentState", "RoundResult", "RoundSession",
           "new_stats"]


@dataclasses.dataclass
class AgentState:
  """One agent's cache for the current round."""

  agent_id: str
  tokens: list[int]
  max_tokens: int
  table: BlockTable
  seg_spans: list[tuple[int, int, Segment]]  # (first position, first block, segment)
  num_prompt: int = 0
  compute_from: int = 0  # prefix caching: first position to compute
  output_ids: list[int] = dataclasses.field(default_factory=list)
  finish_reason: str | None = None
  mirror_blocks: set[int] = dataclasses.field(default_factory=set)
  recompute: np.ndarray | None = None  # positions recomputed by reuse methods
  exact_head: int = 0  # leading positions whose reused K/V are exact (the check skips them)

  @functools.cached_property
  def shared_mask(self) -> np.ndarray:
    """[prompt tokens] bool: True where the token belongs to a shared segment."""
    mask = np.zeros(self.num_prompt, bool)
    for p0, _, seg in self.seg_spans:
      mask[p0:p0 + len(seg)] = seg.shared
    return mask

  def shared_blocks(self) -> set[int]:
    out = set()
    for _, b0, seg in self.seg_spans:
      if seg.shared:
        out.update(range(b0, b0 + pages_needed(len(seg), self.table.page_size)))
    return out


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
  """

  def __init__(self, params, cfg: ModelConfig, *, method: str = "tokendance",
               policy: ReusePolicy = ReusePolicy(), cache_cfg: CacheConfig = CacheConfig(),
               attn: AttentionConfig | None = None, sampling: SamplingParams = SamplingParams(),
               quality: bool = True, max_prefill_tokens: int = 4096, progress: bool = False,
               mesh=None, keep_masters: bool = False, keep_logprobs: bool = False):
    if method not in METHODS:
      raise ValueError(f"method={method!r}; expected one of {', '.join(METHODS)}")
    self.cfg, self.params, self.method, self.policy = cfg, params, method, policy
    if method == "epic" or (method == "tokendance" and policy.select == "epic"):
      self.policy = dataclasses.replace(policy, select="epic")
    if method == "cacheblend" and policy.select == "epic":
      raise ValueError("method cacheblend selects by deviation; use method epic for --select epic")
    if policy.check_layer >= cfg.n_layers:
      raise ValueError(f"check_layer={policy.check_layer} must be < n_layers={cfg.n_layers}")
    self.engine = Engine(params, cfg, cache_cfg=cache_cfg, attn=attn, max_batch=1 << 20,
                         max_prefill_tokens=max_prefill_tokens, mesh=mesh)
    self.params = self.engine.params  # placed on the mesh when there is one
    self.attn = self.engine.attn
    self.cache_cfg = cache_cfg
    self.allocator = self.engine.allocator
    self.masters = diffstore.MasterRegistry(self.allocator)
    self.keep_masters = keep_masters
    self._pinned: list[int] = []  # master pages held for the round in flight (keep_masters)
    if keep_masters:
      self.allocator.reclaim = self.masters.evict
    self.prefix = PrefixCache(self.allocator) if method == "prefix" else None
    self.sampling, self.quality, self.progress = sampling, quality, progress
    self.keep_logprobs = keep_logprobs
    self._want_logits = quality or keep_logprobs  # the prefill returns next-token log-probs
    self.page_bytes = cache_cfg.bytes_per_page(cfg)
    self.round_index = 0
    self.known: dict[str, tuple[int, ...]] = {}  # key -> tokens of every shared segment seen
    self._scratch: model.KVCache | None = None
    # (phase, t0, t1) perf_counter windows of the last round's prefill phases, for
    # profiling (benchmarks attribute compile time and FLOPs to them)
    self.timeline: list[tuple[str, float, float]] = []

  # -- public -------------------------------------------------------------------

  def run_round(self, rnd: Round) -> RoundResult:
    """Prefill (per method), decode every agent, keep what the next round reuses.

    Bad input (see `Round.validate`, unknown `SegmentRef`) raises ValueError
    before any page is touched.
    """
    try:
      return self._run_round(rnd)
    finally:
      self.allocator.free(self._pinned)
      self._pinned = []

  def _run_round(self, rnd: Round) -> RoundResult:
    rnd = rnd.resolve(self.known)
    rnd.validate(self.cfg)
    self.known.update((k, s.tokens) for k, s in rnd.shared_segments().items())
    stats = new_stats()
    self.timeline = []
    start = time.perf_counter()
    if self.method in REUSE_METHODS:
      if not self.keep_masters:
        self.masters.retain_only(rnd.shared_segments().keys())
      self._prefill_masters(rnd, stats)
    prefill_seconds = time.perf_counter() - start
    agents, outputs, logprobs, fps = [], {}, [], []
    waves = self._plan_waves(rnd)
    for wave in waves:
      t0 = time.perf_counter()
      wave_agents, wave_out, lp, fp, wave_prefill = self._run_wave(
          [rnd.prompts[i] for i in wave], stats, t0)
      prefill_seconds += wave_prefill
      agents += wave_agents
      outputs.update(wave_out)
      logprobs.append(lp)
      fps.append(fp)
    fp = fps[0].footprint if len(fps) == 1 else diffstore.combine_footprints(fps)
    logprobs = (jnp.concatenate(logprobs) if len(logprobs) > 1 else logprobs[0]) \
        if self._want_logits else None
    stats.update(waves=len(waves), wave_sizes=[len(w) for w in waves])
    output_keys = {}
    for agent_id, ids in outputs.items():
      if ids:
        output_keys[agent_id] = Segment(tuple(ids), shared=True).key
        self.known[output_keys[agent_id]] = tuple(ids)
    round_seconds = time.perf_counter() - start
    n = len(agents)
    quality = self._quality(rnd, logprobs) if self.quality and self.method != "full" else None
    stats.update(_token_stats(agents, self.cfg), **dataclasses.asdict(fp),
                 masters=len(self.masters.masters), master_pages=self.masters.num_pages,
                 preemptions=self.engine.num_preemptions)
    if self.engine.mesh_plan is not None:
      stats.update(self._device_stats(fp.pages_in_use))
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

  def _run_wave(self, prompts, stats: dict, start: float):
    """Lay out, prefill, decode and hand over one wave of agents. Returns (agents, outputs,
    log-probs or None, footprint after prefill, prefill seconds). On failure the wave's
    sequences are aborted and its pages released."""
    agents = self._layout_all(prompts)
    seqs: list = []  # the engine sequences adopted for decode
    try:
      first, logprobs = self._prefill(agents, stats)
      prefill_seconds = time.perf_counter() - start
      fp = diffstore.wave_footprint([a.table for a in agents],
                                    [a.shared_blocks() for a in agents],
                                    [a.mirror_blocks for a in agents], self.allocator,
                                    self._kept_pages())
      outputs = self._decode(agents, first, seqs)
      self._finish(agents, outputs)
    except BaseException:  # leave the pool as the round found it, less the masters it made
      for s in seqs:
        self.engine.abort(s.seq_id)
      self._release(agents)
      raise
    return agents, outputs, logprobs, fp, prefill_seconds

  def _kept_pages(self) -> set[int]:
    """Pages the session holds across waves and rounds (masters, the prefix cache)."""
    kept = {p for m in self.masters.masters.values() for p in m.pages}
    if self.prefix is not None:
      kept.update(self.prefix.entries.values())
    return kept

  def _plan_waves(self, rnd: Round) -> list[list[int]]:
    """The round's agents in waves that fit the pool (`admission.plan_waves`), from an upper
    bound of each agent's pages: fresh prompt pages, the copy-on-write pages its recompute
    can touch, and its output pages."""
    ps, refcount = self.cache_cfg.page_size, self.allocator.refcount
    evictable = set()
    if self.prefix is not None:
      evictable = {p for p in self.prefix.entries.values() if refcount(p) == 1}
    if self.keep_masters:
      evictable.update(p for m in self.masters.masters.values()
                       if all(refcount(q) == 1 for q in m.pages) for p in m.pages)
    available = self.allocator.num_free + len(evictable)
    claimed, needs = set(), []
    for prompt in rnd.prompts:
      need = pages_needed(prompt.max_tokens, ps)
      if self.prefix is not None:
        blocks = self._block_tokens(prompt)
        hits = self.prefix.peek(blocks)[:len(blocks) - 1]
        need += len(blocks) - len(hits) + len(evictable.intersection(hits) - claimed)
        claimed.update(hits)
      else:
        for seg in prompt.segments:
          n = pages_needed(len(seg), ps)
          if seg.shared and self.method == "tokendance":
            n = 0  # a mirror of the master; its copy-on-write pages are counted below
          need += n
        if self.method == "tokendance":
          shared = sum(pages_needed(len(s), ps) for s in prompt.segments if s.shared)
          need += min(shared, self._cow_bound(prompt))
      needs.append(need)
    return admission.plan_waves(needs, available, [p.agent_id for p in rnd.prompts])

  def _cow_bound(self, prompt) -> int:
    """Most master blocks one agent's recompute can touch (each selected token one block)."""
    ps = self.cache_cfg.page_size
    if self.policy.select == "epic":
      return sum(pages_needed(min(self.policy.epic_k, len(s)), ps) for s in prompt.segments
                 if s.shared)
    shared = sum(len(s) for s in prompt.segments if s.shared)
    return int(round(self.policy.recompute * shared))

  def close(self) -> None:
    """Free masters and cached pages; the pool is empty afterwards."""
    self.masters.clear()
    if self.prefix is not None:
      self.prefix.clear()

  # -- layout -------------------------------------------------------------------

  def _layout_all(self, prompts) -> list[AgentState]:
    agents: list[AgentState] = []
    try:
      for p in prompts:
        agents.append(self._layout(p))
    except BaseException:
      self._release(agents)
      raise
    return agents

  def _layout(self, prompt) -> AgentState:
    """Block table for one prompt: master pages, cached pages or fresh pages per segment."""
    ps = self.cache_cfg.page_size
    a = AgentState(prompt.agent_id, prompt.tokens, prompt.max_tokens, BlockTable(ps), [],
                   num_prompt=prompt.num_tokens)
    hits = self._prefix_hits(prompt) if self.prefix is not None else []
    n_hits = len(hits)
    try:
      pos = 0
      for seg in prompt.segments:
        a.seg_spans.append((pos, len(a.table.pages), seg))
        a.table.append_segment(self._segment_pages(seg, hits), len(seg))
        pos += len(seg)
    except BaseException:
      a.table.release(self.allocator)
      self.allocator.free(hits)
      raise
    a.compute_from = a.table.starts[n_hits] if n_hits else 0
    return a

  def _block_tokens(self, prompt) -> list[tuple[int, ...]]:
    """The prompt's token blocks in the segment layout."""
    ps, out = self.cache_cfg.page_size, []
    for seg in prompt.segments:
      out += [seg.tokens[i:i + ps] for i in range(0, len(seg), ps)]
    return out

  def _prefix_hits(self, prompt) -> list[int]:
    blocks = self._block_tokens(prompt)
    hits = self.prefix.match(blocks)
    if len(hits) == len(blocks):  # keep the last block to compute: its logits start decoding
      self.allocator.free(hits[-1:])
      hits = hits[:-1]
    return hits

  def _segment_pages(self, seg: Segment, hits: list[int]) -> list[int]:
    n = pages_needed(len(seg), self.cache_cfg.page_size)
    if self.method in REUSE_METHODS and seg.shared:
      master = self.masters.get(seg.key).pages
      if self.method == "tokendance":
        self.allocator.share(master)
        return list(master)
      return self.allocator.alloc(n)  # per-request: a dense copy, filled in _prefill
    fresh = self.allocator.alloc(n - min(n, len(hits)))  # before any hit leaves `hits`
    taken = [hits.pop(0) for _ in range(n - len(fresh))]
    return taken + fresh

  # -- prefill --------------------------------------------------------------------

  def _prefill_masters(self, rnd: Round, stats: dict) -> None:
    """Masters for the round's shared segments that have none, per `policy.masters`."""
    if self.keep_masters:  # the round's masters must not be evicted while it runs
      self._pin([k for k in rnd.shared_segments() if k in self.masters])
    missing = [s for k, s in rnd.shared_segments().items() if k not in self.masters]
    if not missing:
      return
    with self._phase(stats, "master_prefill"):
      if self.policy.masters == "context":
        for seq in masters.context_plan(rnd, self.masters.__contains__, self.cfg.max_seq_len):
          stats["master_tokens"] += self._prefill_in_context(seq)
        return
      anchor = next(iter(masters.common_prefix(rnd)), None)  # e.g. the system prompt
      if anchor is not None and anchor.key not in self.masters:
        self._prefill_standalone([anchor], None)  # position 0 in every prompt: exact
        stats["master_tokens"] += len(anchor)
        missing = [s for s in missing if s.key != anchor.key]
      self._prefill_standalone(missing, anchor)
      stats["master_tokens"] += sum(len(s) for s in missing)

  def _prefill_in_context(self, seq: masters.MasterSequence) -> int:
    """One prefill of `seq`: its computed segments become masters; returns tokens computed.

    Segments that already have masters are listed through their pages and
    read as context; the others get fresh pages. A new master records the
    tokens it was computed after (`Master.context`) only while every master
    read before it is itself exact at its place here; after one that is not,
    its K/V is not what a prompt with the same tokens computes, so its
    context is None. On failure every page taken here is freed.
    """
    ps = self.cache_cfg.page_size
    table, tokens, positions, made = BlockTable(ps), [], [], []
    exact = True
    try:
      for seg, compute in zip(seq.segments, seq.compute, strict=True):
        if compute:
          pages = self.allocator.alloc(pages_needed(len(seg), ps))
          made.append((seg, len(table.pages), len(pages), exact))
          positions.append(np.arange(len(tokens), len(tokens) + len(seg)))
        else:
          m = self.masters.get(seg.key)
          exact = exact and m.context is not None and m.context == segment_key(tokens)
          pages = list(m.pages)
          self.allocator.share(pages)
        table.append_segment(pages, len(seg))
        tokens += seg.tokens
      self._run([(table, tokens, np.concatenate(positions))], want_logits=False)
      for seg, b0, n, exact_here in made:
        pages = table.pages[b0:b0 + n]
        self.allocator.share(pages)  # the registry's reference
        self.masters.add(seg.key, seg.tokens, pages, source="context",
                         context=segment_key(tokens[:table.starts[b0]]) if exact_here else None)
    finally:
      table.release(self.allocator)
    if self.keep_masters:
      self._pin([seg.key for seg, *_ in made])
    return sum(len(seg) for seg, *_ in made)

  def _pin(self, keys) -> None:
    pages = [p for k in keys for p in self.masters.get(k).pages]
    self.allocator.share(pages)
    self._pinned += pages

  def _prefill_standalone(self, segs: list[Segment], anchor: Segment | None) -> None:
    """Masters for `segs`, each prefilled alone or right after the `anchor` master's tokens."""
    if not segs:
      return
    ps = self.cache_cfg.page_size
    ctx = self.masters.get(anchor.key) if anchor is not None else None
    n_ctx = len(ctx.tokens) if ctx is not None else 0
    tables, chunks = [], []
    n_ctx_pages = len(ctx.pages) if ctx is not None else 0
    exact = ctx is None or ctx.context == segment_key(())  # the anchor sits at position 0
    try:
      for seg in segs:
        table = BlockTable(ps)
        tables.append(table)
        if ctx is not None:
          self.allocator.share(ctx.pages)
          table.append_segment(list(ctx.pages), n_ctx)
        table.append_segment(self.allocator.alloc(pages_needed(len(seg), ps)), len(seg))
        tokens = list(ctx.tokens if ctx is not None else ()) + list(seg.tokens)
        chunks.append((table, tokens, np.arange(n_ctx, n_ctx + len(seg))))
      self._run(chunks, want_logits=False)
      for table, seg in zip(tables, segs, strict=True):
        pages = table.pages[n_ctx_pages:]
        self.allocator.share(pages)  # the registry's reference
        self.masters.add(seg.key, seg.tokens, pages, source="prefill",
                         context=segment_key(ctx.tokens if ctx is not None else ()) if exact
                         else None)
    finally:
      for table in tables:
        table.release(self.allocator)
    if self.keep_masters:
      self._pin([s.key for s in segs])

  def _prefill(self, agents: list[AgentState], stats: dict):
    """Method-specific prefill; returns (first tokens, log-probs [n, vocab] or None)."""
    if self.method in ("full", "prefix"):
      for a in agents:
        a.recompute = np.arange(a.compute_from, len(a.tokens))
      chunks = [(a.table, a.tokens, a.recompute) for a in agents]
      with self._phase(stats, "recompute"):
        return self._run(chunks, want_logits=self._want_logits)
    if self.method == "tokendance":
      return self._collect(agents, stats, collective=True)
    firsts, logps = [], []
    for a in agents:  # per-request PIC: one agent at a time
      f, lp = self._collect([a], stats, collective=False)
      firsts += f
      logps.append(lp)
    return firsts, (jnp.concatenate(logps) if self._want_logits else None)

  def _collect(self, agents: list[AgentState], stats: dict, collective: bool):
    """Reuse + selective recompute for a group of agents (all of them when collective)."""
    if not collective:
      with self._phase(stats, "copy"):
        src, dst = [], []
        for a in agents:  # the request's own dense copy of every reused block
          for b in sorted(a.shared_blocks()):
            src.append(self._master_page(a, b))
            dst.append(a.table.pages[b])
        self._copy(src, dst)
      stats["pages_copied"] += len(src)
    with self._phase(stats, "check"):
      # ends in a host sync (the selection mask); the round's deviation profile comes from the
      # collective step (per-request runs would each see one agent)
      selected = self._select(agents, stats if collective else None)
    if self.policy.select != "epic":
      stats["checked_tokens"] += sum(len(a.tokens) - a.exact_head for a in agents)
      stats["check_flops"] += sum(self.cfg.prefill_flops(np.arange(a.exact_head, len(a.tokens)),
                                                         layers=self.policy.check_layer + 1)
                                  for a in agents)
    if collective:
      with self._phase(stats, "copy"):
        stats["pages_copied"] += self._copy_on_write(agents, selected)
    with self._phase(stats, "recompute"):
      for a, sel in zip(agents, selected, strict=True):
        a.recompute = np.flatnonzero(sel | ~a.shared_mask)
      return self._run([(a.table, a.tokens, a.recompute) for a in agents],
                       want_logits=self._want_logits)

  @contextlib.contextmanager
  def _phase(self, stats: dict, name: str):
    """Time a prefill phase to the end of its device work: adds to stats[name_seconds],
    appends to `timeline`, and names the span in `jax.profiler` traces."""
    t0 = time.perf_counter()
    with jax.profiler.TraceAnnotation(f"tokendance/{name}"):
      yield
      jax.block_until_ready(self.engine.cache)
    t1 = time.perf_counter()
    stats[f"{name}_seconds"] += t1 - t0
    self.timeline.append((name, t0, t1))

  def _master_page(self, a: AgentState, block: int) -> int:
    for _, b0, seg in a.seg_spans:
      n = pages_needed(len(seg), self.cache_cfg.page_size)
      if seg.shared and b0 <= block < b0 + n:
        return self.masters.get(seg.key).pages[block - b0]
    raise AssertionError(f"block {block} is not in a shared segment")

  def _budget(self, a: AgentState) -> int:
    return int(round(self.policy.recompute * int(a.shared_mask.sum())))

  def _select(self, agents: list[AgentState], stats: dict | None) -> list[np.ndarray]:
    """Per agent: bool [prompt tokens] of reused tokens to recompute. Records the relative
    deviation's quantiles (per page or per token, as selected) in stats["deviation"]."""
    shared = [a.shared_mask for a in agents]
    if self.policy.select == "epic":
      return [self._epic(a, m) for a, m in zip(agents, shared, strict=True)]
    dev, norm = self._deviation(agents)  # [t] each, for the concatenated prompts
    agent_ids = np.concatenate([np.full(len(a.tokens), i) for i, a in enumerate(agents)])
    blocks = np.concatenate([self._block_ids(a) for a in agents])
    _, blocks = np.unique(agent_ids * (1 << 20) + blocks, return_inverse=True)
    candidate = np.concatenate(shared)
    t = bucket(len(candidate), 16)
    pad = lambda x, v=0: np.pad(x, (0, t - len(x)), constant_values=v)  # noqa: E731
    budget = np.array([self._budget(a) for a in agents], np.int32)
    by_block = self.policy.select == "block"
    if stats is not None:
      stats["deviation"] = collector.deviation_profile(dev, norm, candidate,
                                                       blocks if by_block else None)
    tau = -1.0 if self.policy.tau is None else float(self.policy.tau)
    mask = collector.select_tokens(
        pad(dev), pad(norm), pad(agent_ids).astype(np.int32), pad(blocks).astype(np.int32),
        pad(candidate, False), budget, np.float32(tau), num_agents=len(agents),
        by_block=by_block)
    mask = np.asarray(mask)[: len(candidate)]  # the one host sync of the collector
    return np.split(mask, np.cumsum([len(a.tokens) for a in agents])[:-1])

  def _epic(self, a: AgentState, shared: np.ndarray) -> np.ndarray:
    sel = np.zeros(len(a.tokens), bool)
    for p0, _, seg in a.seg_spans:
      if seg.shared:
        sel[p0:p0 + min(self.policy.epic_k, len(seg))] = True
    return sel & shared

  def _block_ids(self, a: AgentState) -> np.ndarray:
    return a.table.slots(0, len(a.tokens)) // self.cache_cfg.page_size

  def _exact_head(self, a: AgentState) -> int:
    """Leading positions of `a` whose reused K/V equal what `a` computes: the run of shared
    segments whose masters were computed after exactly the tokens that precede them here."""
    head = 0
    for p0, _, seg in a.seg_spans:
      m = self.masters.masters.get(seg.key) if seg.shared else None
      if m is None or m.context is None or m.context != segment_key(a.tokens[:p0]):
        break
      head = p0 + len(seg)
    return head

  def _deviation(self, agents: list[AgentState]) -> tuple[np.ndarray, np.ndarray]:
    """Batched check at the check layer past each agent's exact head: (squared deviation of fresh
    from reused keys, squared norm of the reused key), each [t].

    Each agent's exact head (`_exact_head`: e.g. the system prompt and world state every
    prompt starts with) is not recomputed: its pages' first layers are copied once into the
    scratch cache, where every agent's check reads them, and its deviation is 0.
    """
    ps, layer = self.cache_cfg.page_size, self.policy.check_layer
    scratch_of: dict[int, int] = {}  # main-cache page of an exact head -> its scratch copy
    tables = []
    for a in agents:
      a.exact_head = self._exact_head(a)
      t = BlockTable(ps)
      for p0, b0, seg in a.seg_spans:
        if p0 >= a.exact_head:
          break
        pages = [scratch_of.setdefault(a.table.pages[b], 1 + len(scratch_of))
                 for b in range(b0, b0 + pages_needed(len(seg), ps))]
        t.append_segment(pages, len(seg))
      tables.append(t)
    nxt = 1 + len(scratch_of)
    for a, t in zip(agents, tables, strict=True):  # the rest of each prompt: its own pages
      rest = len(a.tokens) - a.exact_head
      t.append_segment(list(range(nxt, nxt + pages_needed(rest, ps))), rest)
      nxt += pages_needed(rest, ps)
    scratch = self._scratch_cache(nxt)
    if scratch_of:
      src, dst = zip(*scratch_of.items(), strict=True)
      scratch = collector.copy_layers(scratch, self.engine.cache, self._pad_pages(src, 0),
                                      self._pad_pages(dst, scratch.num_pages))
    devs, norms = [], []
    sizes = [len(a.tokens) - a.exact_head for a in agents]
    for group in self._token_groups(sizes):
      chunks = [(tables[i], agents[i].tokens, np.arange(agents[i].exact_head,
                                                        len(agents[i].tokens))) for i in group]
      batch, _ = build_batch(chunks)
      reuse = np.full(batch.tokens.shape[0], -1, np.int32)
      cursor = 0
      for i in group:
        a, h, n = agents[i], agents[i].exact_head, len(agents[i].tokens)
        reuse[cursor:cursor + n - h] = np.where(a.shared_mask[h:], a.table.slots(h, n), -1)
        cursor += n - h
      if self.engine.mesh_plan is not None:
        batch, = self.engine.place(batch)
        reuse = self.engine.mesh_plan.shard_tokens(reuse)
      check = self.engine.jitted(collector.check_deviation, 2, self._scratch_sharding())
      dev, norm, scratch = check(self.params, scratch, self.engine.cache.k[layer], batch, reuse,
                                 cfg=self.cfg, attn=self.attn, check_layer=layer)
      dev, norm, cursor = np.asarray(dev), np.asarray(norm), 0
      for i in group:  # the exact head: deviation 0, its keys' norms not needed
        h, n = agents[i].exact_head, len(agents[i].tokens)
        devs.append(np.concatenate([np.zeros(h, np.float32), dev[cursor:cursor + n - h]]))
        norms.append(np.concatenate([np.zeros(h, np.float32), norm[cursor:cursor + n - h]]))
        cursor += n - h
    self._scratch = scratch
    return np.concatenate(devs), np.concatenate(norms)

  def _pad_pages(self, pages, fill: int) -> np.ndarray:
    """Page ids padded to a bucketed length with `fill` (an out-of-range fill is dropped)."""
    out = np.full(bucket(len(pages), 8), fill, np.int32)
    out[:len(pages)] = pages
    return out

  def _token_groups(self, sizes: list[int]) -> list[list[int]]:
    """Agents grouped so each group's tokens fit one prefill batch (an agent is never split)."""
    groups, cur, size = [], [], 0
    for i, n in enumerate(sizes):
      if cur and size + n > self.engine.max_prefill_tokens:
        groups.append(cur)
        cur, size = [], 0
      cur.append(i)
      size += n
    return groups + [cur]

  def _scratch_cache(self, pages: int) -> model.KVCache:
    pages = bucket(pages, 64)
    if self._scratch is None or self._scratch.num_pages < pages:
      sub = dataclasses.replace(self.cfg, n_layers=self.policy.check_layer + 1)
      sub_pool = dataclasses.replace(self.cache_cfg, num_pages=pages)
      plan = self.engine.mesh_plan
      self._scratch = (model.KVCache.create(sub, sub_pool) if plan is None
                       else plan.create_cache(sub, sub_pool))
    return self._scratch

  def _scratch_sharding(self):
    plan = self.engine.mesh_plan
    if plan is None:
      return None
    sub_pool = dataclasses.replace(self.cache_cfg, num_pages=self._scratch.num_pages)
    return plan.cache_sharding(self.cfg, sub_pool, n_layers=self.policy.check_layer + 1)

  def _device_stats(self, pages_in_use: int) -> dict:
    """Per-device memory under a mesh. The page axis is not sharded: every device holds
    its kv-head share of every page, so in-use bytes per device scale with kv-head shards."""
    plan = self.engine.mesh_plan
    frac = plan.kv_fraction_per_device()
    return {"mesh": sharding.describe(plan.mesh), "devices": plan.mesh.size,
            "pages_sharded": plan.mesh_axis("pages") is not None,
            "kv_bytes_in_use_per_device": pages_in_use * self.page_bytes * frac,
            "kv_pool_bytes_per_device": plan.bytes_per_device(self.engine.cache),
            "param_bytes_per_device": plan.bytes_per_device(self.params)}

  def _copy_on_write(self, agents: list[AgentState], selected: list[np.ndarray]) -> int:
    """Give each agent its own page for every master block it recomputes any token of."""
    src, dst = [], []
    ps = self.cache_cfg.page_size
    for a, sel in zip(agents, selected, strict=True):
      touched = set((a.table.slots_at(np.flatnonzero(sel)) // ps).tolist())
      for b in sorted(a.shared_blocks()):
        master = a.table.pages[b]
        if master not in touched:
          continue
        own = self.allocator.alloc(1)[0]
        start, length = a.table.starts[b], a.table.lens[b]
        if not sel[start:start + length].all():  # a partly recomputed block keeps the rest
          src.append(master)
          dst.append(own)
        a.table.pages[b] = own
        self.allocator.free([master])
        a.mirror_blocks.add(b)
    self._copy(src, dst)
    return len(src)

  def _copy(self, src: list[int], dst: list[int]) -> None:
    if not src:
      return
    self.engine.copy_pages(self._pad_pages(src, 0), self._pad_pages(dst, self.cache_cfg.num_pages))

  def _run(self, chunks, want_logits: bool):
    """`Engine.prefill` of chunks (table, tokens, positions), chunk i sampled per
    `_sampling_for(i)`: (first tokens, log-probs [n, vocab] or None)."""
    return self.engine.prefill(chunks, want_logits,
                               [self._sampling_for(i) for i in range(len(chunks))])

  def _sampling_for(self, i: int, max_tokens: int = 1) -> SamplingParams:
    s = self.sampling
    return dataclasses.replace(s, max_tokens=max_tokens, seed=(s.seed + 7919 * i) % (1 << 32))

  # -- decode and hand-over ---------------------------------------------------------

  def _decode(self, agents: list[AgentState], first: list[int], seqs: list) -> dict[str, list[int]]:
    """Decode every agent in the engine; `seqs` collects the adopted sequences as they are
    made (the caller aborts them on failure)."""
    for i, (a, tok) in enumerate(zip(agents, first, strict=True)):
      seqs.append(self.engine.adopt(a.tokens, a.table, tok, self._sampling_for(i, a.max_tokens)))
    bar = progress_bar(sum(a.max_tokens for a in agents), enabled=self.progress, unit="tok",
                       desc="decode")
    while self.engine.has_unfinished():
      before = sum(len(s.output) for s in seqs)
      self.engine.step()
      bar.update(sum(len(s.output) for s in seqs) - before)
    bar.close()
    for a, s in zip(agents, seqs, strict=True):
      done = self.engine.pop_finished(s.seq_id)
      a.tokens, a.output_ids, a.finish_reason = s.tokens, done.output_ids, done.finish_reason
    return {a.agent_id: _strip_stop(a) for a in agents}

  def _finish(self, agents: list[AgentState], outputs: dict[str, list[int]]) -> None:
    """Complete output K/V, hand outputs to masters / prefix cache, release the round."""
    pending = []
    for a in agents:
      out = outputs[a.agent_id]
      last = a.num_prompt + len(out) - 1  # the last output position that must hold K/V
      if out and last == len(a.tokens) - 1:  # stopped by length: its last token was never fed
        a.table.ensure(len(a.tokens), self.allocator)
        pending.append((a.table, a.tokens, np.array([last])))
    if pending:
      self._run(pending, want_logits=False)
    for a in agents:
      out = outputs[a.agent_id]
      if self.method in REUSE_METHODS and out and self.policy.masters == "decode":
        pages = diffstore.output_master_pages(a.table, a.num_prompt, len(out))
        if pages is not None:
          self.allocator.share(pages)
          self.masters.add(Segment(tuple(out), shared=True).key, out, pages, source="decode")
      if self.prefix is not None:
        self._cache_blocks(a, a.num_prompt + len(out))
    self._release(agents)

  def _cache_blocks(self, a: AgentState, known: int) -> None:
    """Insert the leading blocks whose K/V are complete into the prefix cache."""
    blocks, pages = [], []
    for page, start, length in zip(a.table.pages, a.table.starts, a.table.lens, strict=True):
      if start + length > known:
        break
      blocks.append(tuple(a.tokens[start:start + length]))
      pages.append(page)
    self.prefix.insert(blocks, pages)

  def _release(self, agents: list[AgentState]) -> None:
    for a in agents:
      a.table.release(self.allocator)

  # -- quality ------------------------------------------------------------------------

  def _quality(self, rnd: Round, logprobs) -> dict:
    """Next-token agreement with `full` on the same prompts (untimed)."""
    tables = []
    try:
      for p in rnd.prompts:
        t = BlockTable(self.cache_cfg.page_size)
        for seg in p.segments:
          t.append_segment(self.allocator.alloc(pages_needed(len(seg), t.page_size)), len(seg))
        tables.append(t)
      chunks = [(t, p.tokens, np.arange(p.num_tokens)) for t, p in zip(tables, rnd.prompts,
                                                                        strict=True)]
      _, ref = self._run(chunks, want_logits=True)
    except OutOfPages:
      return {"skipped": "pool too small for the reference prefill"}
    finally:
      for t in tables:
        t.release(self.allocator)
    return next_token_quality(ref, logprobs)


def _strip_stop(a: AgentState) -> list[int]:
  out = list(a.output_ids)
  if a.finish_reason == "stop" and out:
    out = out[:-1]
  return out


def new_stats() -> dict:
  """A round's prefill counters, all zero."""
  return dict(master_prefill_seconds=0.0, check_seconds=0.0, copy_seconds=0.0,
              recompute_seconds=0.0, pages_copied=0, check_flops=0.0, master_tokens=0,
              checked_tokens=0)


def _token_stats(agents: list[AgentState], cfg: ModelConfig) -> dict:
  """Tokens computed in the round, in all and per agent (reused shared tokens recomputed,
  out of the agent's shared tokens)."""
  prompt = sum(a.num_prompt for a in agents)
  done = [a.recompute for a in agents if a.recompute is not None]
  recomputed = sum(len(r) for r in done)
  shared = {a.agent_id: int(a.shared_mask.sum()) for a in agents}
  shared_recomputed = {a.agent_id: int(a.shared_mask[a.recompute].sum()) for a in agents
                       if a.recompute is not None}
  return {"prompt_tokens": prompt, "computed_tokens": recomputed,
          "computed_fraction": recomputed / max(prompt, 1),
          "computed_flops": float(sum(cfg.prefill_flops(r) for r in done)),
          "shared_tokens_per_agent": shared,
          "shared_recomputed_per_agent": shared_recomputed}
