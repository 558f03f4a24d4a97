"""Continuous-batching generation over the paged KV cache.

A `Sequence` owns a block table; its `tokens` are prompt plus generated ids
and `num_computed` of them have K/V in the cache. Each `step` runs one
jit-compiled forward: a ragged prefill batch (chunked) while any admitted
sequence has more than one uncomputed token, otherwise a decode batch of every
running sequence. Sequences join and leave between steps. Shapes are padded to
power-of-two buckets so a steady state never recompiles, and each step makes a
single device-to-host copy (the sampled tokens).

With `prefix_caching`, full blocks of every computed sequence enter a
`prefix_cache.PrefixCache` (vLLM's hash chain, reference counts, LRU eviction
of pages only the cache holds), and a new sequence's leading blocks found
there are not computed again (`Sequence.cached_tokens`). Matching runs when a
sequence is admitted and again before its first prefill chunk, so requests
admitted together still reuse the blocks the first of them computes.

When the pool runs out of pages the newest running sequence is preempted:
its pages are freed and it is re-queued to recompute later; no other
sequence's pages are touched. An adopted sequence (a round's agent, whose
prompt pages may be master pages it mirrors) gives back only the pages of
its generated tokens and recomputes just those, so its prompt K/V stay the
ones it was handed. When the one sequence left cannot grow, the step raises
`OutOfPages`.

Outside callers use the public surface only: `add_request` / `generate`,
`prefill` (scattered positions over caller-owned block tables), `adopt`,
`step`, `abort`, `pop_finished` and `copy_pages`.
"""

from __future__ import annotations

import collections
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from tokendance_jax import batch as batch_mod
from tokendance_jax import collector, model, sampling, sharding
from tokendance_jax.batch import bucket, build_batch  # noqa: F401 - bucket re-exported
from tokendance_jax.config import AttentionConfig, CacheConfig, ModelConfig
from tokendance_jax.paging import BlockTable, OutOfPages, PageAllocator, pages_needed
from tokendance_jax.prefix_cache import PrefixCache, servable
from tokendance_jax.progress import bar as progress_bar
from tokendance_jax.sampling import SamplingParams
from tokendance_jax.sequence import CacheLost, GenerationResult, Sequence

__all__ = ["CacheLost", "Engine", "GenerationResult", "Sequence", "bucket", "build_batch"]


@functools.partial(jax.jit, static_argnames=("cfg", "attn", "decode", "plan"),
                   donate_argnames=("cache",))
def _model_step(params, cache, batch, samp, *, cfg, attn, decode, plan=None):
  logits, cache = model.forward(params, cache, batch, cfg=cfg, attn=attn, decode=decode, plan=plan)
  return sampling.sample(logits, samp), cache


@functools.partial(jax.jit, static_argnames=("cfg", "attn", "plan"), donate_argnames=("cache",))
def _model_step_logits(params, cache, batch, samp, *, cfg, attn, plan=None):
  """A prefill step that also returns log-probabilities [rows, vocab] (for quality checks)."""
  logits, cache = model.forward(params, cache, batch, cfg=cfg, attn=attn, plan=plan)
  return sampling.sample(logits, samp), jax.nn.log_softmax(logits, axis=-1), cache


_JIT_KW = {
    "_model_step": dict(static_argnames=("cfg", "attn", "decode", "plan"),
                        donate_argnames=("cache",)),
    "_model_step_logits": dict(static_argnames=("cfg", "attn", "plan"), donate_argnames=("cache",)),
    "check_deviation": dict(static_argnames=("cfg", "attn", "check_layer", "plan"),
                            donate_argnames=("scratch",)),
}


class Engine:
  """Paged, continuously batched generation for one model.

  Args:
    params: params pytree (see `weights.load_params` / `model.init_params`).
    cfg: the model config.
    cache_cfg: page pool geometry.
    attn: attention implementation; default picks kernels on GPU and the jnp
      reference on CPU (`AttentionConfig.default_for_backend`).
    max_batch: most sequences running at once.
    max_prefill_tokens: tokens per prefill step, per pool shard (longer prompts are chunked).
    mesh: None (one device), or a `jax.sharding.Mesh`, "data=2,model=3" spec or
      `sharding.MeshPlan`: params, pool and batches are then placed per its rules.
    prefix_caching: reuse full blocks of earlier sequences with the same leading tokens
      (`self.prefix`; see the module docstring).
  """

  def __init__(self, params, cfg: ModelConfig, *, cache_cfg: CacheConfig = CacheConfig(),
               attn: AttentionConfig | None = None, max_batch: int = 32,
               max_prefill_tokens: int = 512, mesh=None, prefix_caching: bool = False):
    if max_batch < 1 or max_prefill_tokens < 16:
      raise ValueError(f"max_batch={max_batch} must be >= 1 and "
                       f"max_prefill_tokens={max_prefill_tokens} >= 16")
    self.cfg, self.cache_cfg = cfg, cache_cfg
    self.attn = attn or AttentionConfig.default_for_backend()
    self.max_batch, self.max_prefill_tokens = max_batch, max_prefill_tokens
    self.mesh_plan = sharding.as_plan(mesh)
    self.params = params if self.mesh_plan is None else self.mesh_plan.shard_params(params, cfg)
    self.cache = self._new_cache()
    self.cache_epoch = 0  # bumped each time the cache is lost (`CacheLost`)
    shards = self.mesh_plan.shards if self.mesh_plan is not None else 1
    if cache_cfg.num_pages % shards:
      raise ValueError(f"num_pages={cache_cfg.num_pages} must divide by the {shards} pool "
                       f"shards of the mesh's data axis")
    self.allocator = PageAllocator(cache_cfg.num_pages, shards)
    self.prefix = PrefixCache(self.allocator) if prefix_caching else None
    self.waiting: collections.deque[Sequence] = collections.deque()
    self.running: list[Sequence] = []
    self.finished: dict[int, Sequence] = {}
    self.num_preemptions = 0
    self.num_steps = 0
    self._ids = itertools.count()

  def enable_prefix_caching(self) -> None:
    """Turn automatic prefix caching on (a no-op when it is on already)."""
    if self.prefix is None:
      self.prefix = PrefixCache(self.allocator)

  # -- requests --------------------------------------------------------------

  def add_request(self, prompt_ids, params: SamplingParams = SamplingParams()) -> int:
    """Queue a prompt; returns its sequence id. Raises ValueError on bad input."""
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
      raise ValueError("prompt is empty")
    bad = [t for t in prompt if not 0 <= t < self.cfg.vocab_size]
    if bad:
      raise ValueError(f"token ids {bad[:5]} outside the vocabulary [0, {self.cfg.vocab_size})")
    total = len(prompt) + params.max_tokens
    if total > self.cfg.max_seq_len:
      raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) = "
                       f"{total} exceeds the model context {self.cfg.max_seq_len}")
    need = pages_needed(total, self.cache_cfg.page_size)
    room = self.allocator.pages_per_shard - 1
    if need > room:
      where = f" per shard ({self.allocator.shards} shards)" if self.allocator.shards > 1 else ""
      raise ValueError(f"request needs {need} pages; the pool has {room}{where}")
    seq = Sequence(seq_id=next(self._ids), prompt=prompt, params=params,
                   table=BlockTable(self.cache_cfg.page_size), tokens=list(prompt))
    self.waiting.append(seq)
    return seq.seq_id

  def adopt(self, prompt, table: BlockTable, first_token: int, params: SamplingParams) -> Sequence:
    """Take over a sequence whose prompt K/V is already in `table` (e.g. a round's agents).

    Decoding continues from `first_token`, sampled by the caller from the
    prompt's last logits. Finished adopted sequences keep their pages
    (`retain`); the caller releases them.
    """
    seq = Sequence(seq_id=next(self._ids), prompt=list(prompt), params=params, table=table,
                   tokens=list(prompt), num_computed=len(prompt), retain=True,
                   keep_blocks=len(table.pages))
    self.running.append(seq)
    self._append(seq, int(first_token))
    return seq

  def has_unfinished(self) -> bool:
    return bool(self.waiting or self.running)

  @property
  def num_waiting(self) -> int:
    return len(self.waiting)

  def sequence(self, seq_id: int) -> Sequence:
    """The live sequence `seq_id` (waiting, running or finished); KeyError if unknown."""
    for seq in itertools.chain(self.waiting, self.running):
      if seq.seq_id == seq_id:
        return seq
    return self.finished[seq_id]

  def abort(self, seq_id: int) -> Sequence | None:
    """Remove a sequence wherever it is (waiting, running or finished); returns it, or None
    for an unknown id. Its pages are freed unless it was adopted (`retain`): those stay in
    its table for the caller to release."""
    for seq in itertools.chain(self.waiting, self.running):
      if seq.seq_id == seq_id:
        (self.waiting if seq in self.waiting else self.running).remove(seq)
        break
    else:
      return self.finished.pop(seq_id, None)
    if not seq.retain:
      seq.table.release(self.allocator)
    seq.finish_reason = seq.finish_reason or "abort"
    return seq

  def pop_finished(self, seq_id: int) -> GenerationResult:
    seq = self.finished.pop(seq_id)
    return GenerationResult(seq.seq_id, seq.prompt, seq.output, seq.finish_reason)

  def generate(self, prompts, params: SamplingParams | list[SamplingParams] = SamplingParams(),
               progress: bool = False) -> list[GenerationResult]:
    """Generate for every prompt (token-id lists); results in prompt order."""
    plist = params if isinstance(params, list) else [params] * len(prompts)
    if len(plist) != len(prompts):
      raise ValueError(f"{len(plist)} sampling params for {len(prompts)} prompts")
    ids = [self.add_request(p, sp) for p, sp in zip(prompts, plist, strict=True)]
    bar = progress_bar(sum(sp.max_tokens for sp in plist), enabled=progress, unit="tok",
                       desc="generate")
    while self.has_unfinished():
      before = self._generated_count()
      self.step()
      bar.update(self._generated_count() - before)
    bar.close()
    return [self.pop_finished(i) for i in ids]

  def _generated_count(self) -> int:
    seqs = itertools.chain(self.running, self.waiting, self.finished.values())
    return sum(len(s.output) for s in seqs)

  # -- scheduling --------------------------------------------------------------

  def step(self) -> None:
    """Admit what fits, then run one prefill or one decode batch."""
    self._admit()
    if not self.running:
      return
    if self.prefix is not None:  # blocks a sequence admitted with this one has computed since
      for seq in self.running:
        if not seq.retain and seq.num_computed == seq.cached_tokens and seq.pending > 1:
          self._match_prefix(seq)
    prefill = [s for s in self.running if s.pending > 1]
    if prefill:
      self._run(self._pack_prefill(prefill), decode=False)
    else:
      self._run(self._reserve_decode(), decode=True)
    self.num_steps += 1

  def _admit(self) -> None:
    while self.waiting and len(self.running) < self.max_batch:
      seq = self.waiting[0]
      if not seq.table.pages:
        seq.table.shard = self._place(seq)
        if self.prefix is not None:
          self._match_prefix(seq)
      try:
        seq.table.ensure(len(seq.tokens), self.allocator)
      except OutOfPages:
        if not self.running:  # cannot happen: add_request checked the pool size
          raise
        return
      self.running.append(self.waiting.popleft())

  def _place(self, seq: Sequence) -> int:
    """The pool shard for a sequence with no pages yet: the longest prefix-cache hit, then
    the most free pages."""
    a = self.allocator
    if a.shards == 1:
      return 0
    blocks = self._prompt_blocks(seq) if self.prefix is not None else []

    def rank(d: int):
      return (len(self.prefix.peek(blocks, d)) if blocks else 0, a.free_in(d), -d)

    return max(range(a.shards), key=rank)

  def _prompt_blocks(self, seq: Sequence) -> list[tuple[int, ...]]:
    """seq's prompt blocks that prefix caching may serve (`prefix_cache.servable`)."""
    ps = self.cache_cfg.page_size
    return servable([tuple(seq.prompt[i:i + ps]) for i in range(0, len(seq.prompt), ps)])

  def _match_prefix(self, seq: Sequence) -> None:
    """Serve seq's leading full blocks from the prefix cache where it holds them.

    Only blocks before the prompt's last token are matched: that token must be
    computed, its logits sample the first output. Blocks past those already
    taken replace the table's fresh pages (or start an empty table).
    """
    ps, shard = self.cache_cfg.page_size, seq.table.shard
    blocks = self._prompt_blocks(seq)
    if len(self.prefix.peek(blocks, shard)) <= seq.cached_blocks:
      return
    hits = self.prefix.match(blocks, shard)  # one reference on each, including those seq holds
    self.allocator.free(hits[:seq.cached_blocks])
    new = hits[seq.cached_blocks:]
    if seq.table.pages:
      seq.table.replace_pages(seq.cached_blocks, new, self.allocator)
    else:
      seq.table.append_segment(new, len(new) * ps)
    seq.cached_blocks = len(hits)
    seq.cached_tokens = seq.num_computed = len(hits) * ps
    if len(hits) > seq.inserted_blocks:  # the chain's key at the new end is not kept
      seq.inserted_blocks, seq.chain_key = len(hits), None

  def _cache_blocks(self, seq: Sequence) -> None:
    """Offer seq's newly completed full blocks to the prefix cache, chained from the last
    block it offered (each block is hashed once, not once per later block)."""
    ps = self.cache_cfg.page_size
    full = seq.num_computed // ps
    if full > seq.inserted_blocks and not seq.retain:
      start = seq.inserted_blocks if seq.chain_key is not None else 0
      seq.chain_key = self.prefix.insert(
          [tuple(seq.tokens[i * ps:(i + 1) * ps]) for i in range(start, full)],
          seq.table.pages[start:full], parent=seq.chain_key)
      seq.inserted_blocks = full

  def _pack_prefill(self, seqs: list[Sequence]) -> list[tuple[Sequence, int]]:
    """Chunks (seq, n_tokens) filling at most max_prefill_tokens per pool shard (each shard's
    device computes its own)."""
    left, chunks = collections.defaultdict(lambda: self.max_prefill_tokens), []
    for seq in seqs:
      shard = seq.table.shard
      if left[shard] == 0:
        continue
      n = min(seq.pending, left[shard])
      chunks.append((seq, n))
      left[shard] -= n
    return chunks

  def _reserve_decode(self) -> list[tuple[Sequence, int]]:
    """One token per running sequence, preempting the newest when pages run out.

    Raises OutOfPages when the sequence that needs a page is the only one left
    running: preempting it would free nothing that it could then use.
    """
    i = 0
    while i < len(self.running):
      seq = self.running[i]
      try:
        seq.table.ensure(len(seq.tokens), self.allocator)
        i += 1
      except OutOfPages as e:
        a, shard = self.allocator, seq.table.shard
        same = [s for s in self.running if s.table.shard == shard]  # pages come from its shard
        if len(same) == 1:
          raise OutOfPages(e.requested, e.free,
                           f"sequence {seq.seq_id} needs a page to grow past "
                           f"{len(seq.tokens) - 1} tokens and no other sequence holds pages "
                           f"to preempt ({a.used_in(shard)} of {a.pages_per_shard - 1} pages "
                           "in use)", shard=e.shard) from None
        self._preempt(same[-1])
    return [(s, 1) for s in self.running]

  def _preempt(self, seq: Sequence) -> None:
    if seq.keep_blocks:  # adopted: keep the prompt's pages, recompute the generated tokens
      seq.table.truncate(seq.keep_blocks, self.allocator)
      seq.num_computed = len(seq.prompt)
    else:
      seq.table.release(self.allocator)
      seq.num_computed = seq.cached_tokens = seq.cached_blocks = seq.inserted_blocks = 0
      seq.chain_key = None
    self.running.remove(seq)
    self.waiting.appendleft(seq)
    self.num_preemptions += 1

  # -- execution ---------------------------------------------------------------

  def _run(self, chunks: list[tuple[Sequence, int]], decode: bool) -> None:
    batch, sampled, row_of = self._build_batch(chunks, decode)
    samp = batch_mod.row_sampling(
        [s.params if i in sampled else None for i, (s, _) in enumerate(chunks)],
        [len(s.output) for s, _ in chunks], row_of, batch)
    batch, samp = self.place(batch, samp)
    tokens, = self.donate(self.jitted(_model_step, 1), batch, samp, cfg=self.cfg, attn=self.attn,
                          decode=decode)
    tokens = np.asarray(tokens)  # the step's one device-to-host copy
    for i, (seq, n) in enumerate(chunks):
      seq.num_computed += n
      if self.prefix is not None:
        self._cache_blocks(seq)
      if i in sampled:
        self._append(seq, int(tokens[row_of[i]]))

  def prefill(self, chunks, want_logits: bool = False,
              params: list[SamplingParams | None] | None = None):
    """Feed chunks over caller-owned block tables, in batches of max_prefill_tokens (per pool
    shard).

    A chunk is (table, tokens, positions): tokens[positions] are fed at those
    (increasing, possibly scattered) positions and their K/V written through
    `table`, which must already have slots for them. A chunk whose positions
    end its tokens samples its first token with params[i] (greedy by default).
    Returns (those first tokens in chunk order, and their log-probs
    [n, vocab] when want_logits, else None). The engine's own sequences are
    not touched.
    """
    budget = self.max_prefill_tokens
    params = params or [None] * len(chunks)
    pieces = [(i, c[0], c[1], c[2][j:j + budget])
              for i, c in enumerate(chunks) for j in range(0, max(len(c[2]), 1), budget)]
    firsts, logps, batch_items = {}, {}, []
    size = collections.Counter()  # tokens per pool shard in the batch being packed
    for piece in pieces + [None]:
      if piece is not None and (not batch_items or size[piece[1].shard] + len(piece[3]) <= budget):
        batch_items.append(piece)
        size[piece[1].shard] += len(piece[3])
        continue
      self._prefill_batch(batch_items, params, want_logits, firsts, logps)
      batch_items, size = ([piece], collections.Counter()) if piece is not None else ([], None)
      if piece is not None:
        size[piece[1].shard] = len(piece[3])
    order = sorted(firsts)
    lp = jnp.stack([logps[i] for i in order]) if want_logits and order else None
    return [firsts[i] for i in order], lp

  def _prefill_batch(self, items, params, want_logits, firsts, logps) -> None:
    if not items:
      return
    batch, sampled, row_of = build_batch([(t, toks, pos) for _, t, toks, pos in items],
                                         shards=self.allocator.shards)
    greedy = SamplingParams(max_tokens=1)
    samp = batch_mod.row_sampling([(params[i] or greedy) if j in sampled else None
                                   for j, (i, *_) in enumerate(items)],
                                  [0] * len(items), row_of, batch)
    batch, samp = self.place(batch, samp)
    tokens, logp = self.donate(self.jitted(_model_step_logits, 2), batch, samp, cfg=self.cfg,
                               attn=self.attn)
    tokens = np.asarray(tokens)
    for j, (i, *_) in enumerate(items):
      if j in sampled:
        firsts[i] = int(tokens[row_of[j]])
        if want_logits:
          logps[i] = logp[row_of[j]]

  def copy_pages(self, src, dst) -> None:
    """Copy pages src[i] -> dst[i] in every layer (padded page lists; see collector.copy_pages);
    on a sharded pool across shards too (`sharding.shard_copy_pages`)."""
    plan = self.mesh_plan
    if plan is None or not plan.pages_sharded:
      self.donate(lambda _, cache: (collector.copy_pages(cache, src, dst),))
      return
    src, dst = plan.replicate((np.asarray(src, np.int32), np.asarray(dst, np.int32)))
    self.donate(lambda _, cache: (collector.copy_pages_sharded(cache, src, dst, plan=plan),))

  def donate(self, step, *args, **kwargs) -> tuple:
    """`step(params, cache, *args, **kwargs)`, which donates the cache and returns its outputs
    then the new cache; keeps the new cache and returns the other outputs. If the step
    fails after the cache was donated, raises `CacheLost` (see there)."""
    try:
      *out, self.cache = step(self.params, self.cache, *args, **kwargs)
    except BaseException as e:
      if not (self.cache.k.is_deleted() or self.cache.v.is_deleted()):
        raise  # failed before the cache changed hands: nothing lost
      lost = [seq.seq_id for seq in itertools.chain(self.waiting, self.running)]
      for seq_id in lost:
        self.abort(seq_id)
      if self.prefix is not None:  # its pages hold zeros in the new cache
        self.prefix.clear()
      self.cache = self._new_cache()
      self.cache_epoch += 1
      raise CacheLost(lost, e) from e
    return tuple(out)

  def _new_cache(self) -> model.KVCache:
    if self.mesh_plan is None:
      return model.KVCache.create(self.cfg, self.cache_cfg)
    return self.mesh_plan.create_cache(self.cfg, self.cache_cfg)

  def place(self, batch, *replicated):
    """Batch and extra host inputs, placed on the mesh (unchanged without one)."""
    if self.mesh_plan is None:
      return (batch, *replicated)
    return (self.mesh_plan.shard_batch(batch), *self.mesh_plan.replicate(replicated))

  def jitted(self, step, n_out: int, cache_sharding=None, plan=None):
    """`step` (a jitted fn returning n_out outputs, then a cache) as run on this engine.

    Without a mesh it is `step` itself; with one, the same function compiled
    once per mesh (or per `plan`, e.g. a scratch cache's) with replicated outputs
    and the cache pinned in its sharding.
    """
    plan = plan or self.mesh_plan
    if plan is None:
      return step
    cache_sharding = cache_sharding or plan.cache_sharding(self.cfg, self.cache_cfg)
    out = (plan.replicated,) * n_out + (cache_sharding,)
    return sharding.jit_step(step.__wrapped__, plan, out, **_JIT_KW[step.__name__])

  def _build_batch(self, chunks, decode: bool):
    """Pad the chunks into a bucketed `model.Batch` (`batch.build_batch`)."""
    return build_batch([(s.table, s.tokens, s.num_computed, n) for s, n in chunks], decode,
                       shards=self.allocator.shards)

  def _append(self, seq: Sequence, token: int) -> None:
    seq.tokens.append(token)
    p = seq.params
    if (token in p.stop_token_ids) or (not p.ignore_eos and token in self.cfg.eos_ids):
      self._finish(seq, "stop")
    elif len(seq.output) >= p.max_tokens or len(seq.tokens) >= self.cfg.max_seq_len:
      self._finish(seq, "length")

  def _finish(self, seq: Sequence, reason: str) -> None:
    seq.finish_reason = reason
    if not seq.retain:
      seq.table.release(self.allocator)
    self.running.remove(seq)
    self.finished[seq.seq_id] = seq
