"""Stages 5-7 of a round for the reuse methods: check, select, copy-on-write, recompute.

The KV Collector's host side. For a group of agents (all of a round's
agents at once for tokendance, one at a time for per-request PIC):

1. check: one batched prefill to the check layer past each agent's exact
   head, in a scratch cache, comparing fresh keys with the reused ones
   (`collector.check_deviation`);
2. select: one batched selection per the policy (`collector.select_tokens`;
   EPIC's fixed rule in `selection.epic_selection`); the exact head is never a
   candidate (a recompute would give the same K/V);
3. copy-on-write (mirrors only): an agent's own page for each master block
   its selection touches (`selection.copy_on_write_plan`);
4. recompute: the selected tokens and every private token, through
   `Engine.prefill`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tokendance_jax import collector, model, selection
from tokendance_jax.batch import bucket, build_batch
from tokendance_jax.layout import AgentState
from tokendance_jax.paging import NULL_PAGE, BlockTable, pages_needed
from tokendance_jax.roundctx import pad_pages

__all__ = ["Collector"]


class Collector:
  """Check, select, copy-on-write and recompute (see the module docstring)."""

  def __init__(self, ctx):
    self.ctx = ctx
    self.scratch: model.KVCache | None = None  # the check's cache, kept and grown

  def collect(self, agents: list[AgentState], stats: dict, collective: bool):
    """Reuse + selective recompute for `agents`: (first tokens, log-probs or None).

    collective: the agents are mirrors of the masters (tokendance), checked
    together; otherwise each holds a dense copy of its reused blocks, made here.
    """
    ctx, policy = self.ctx, self.ctx.policy
    if not collective:
      with ctx.phase(stats, "copy"):
        src, dst = [], []
        for a in agents:  # the request's own dense copy of every reused block
          for b0, n, seg in a.shared_spans():
            src += ctx.masters.get(seg.key).on(a.table.shard)[:n]
            dst += a.table.pages[b0:b0 + n]
        ctx.copy(src, dst)
      stats["pages_copied"] += len(src)
    with ctx.phase(stats, "check"):
      # ends in a host sync (the selection mask); the round's deviation profile comes from the
      # collective step (per-request runs would each see one agent)
      selected = self.select(agents, stats if collective else None)
    if policy.select != "epic":
      stats["checked_tokens"] += sum(len(a.tokens) - a.exact_head for a in agents)
      stats["check_flops"] += sum(ctx.cfg.prefill_flops(np.arange(a.exact_head, len(a.tokens)),
                                                        layers=policy.check_layer + 1)
                                  for a in agents)
    if collective:
      with ctx.phase(stats, "copy"):
        stats["pages_copied"] += self.copy_on_write(agents, selected)
    with ctx.phase(stats, "recompute"):
      for a, sel in zip(agents, selected, strict=True):
        a.recompute = np.flatnonzero(sel | ~a.shared_mask)
      return ctx.run([(a.table, a.tokens, a.recompute) for a in agents],
                     want_logits=ctx.want_logits)

  def select(self, agents: list[AgentState], stats: dict | None) -> list[np.ndarray]:
    """Per agent: bool [prompt tokens] of reused tokens to recompute. Records the relative
    deviation's quantiles (per page or per token, as selected) in stats["deviation"]."""
    policy, ps = self.ctx.policy, self.ctx.page_size
    shared = [a.shared_mask for a in agents]
    if policy.select == "epic":
      return [selection.epic_selection(a.seg_spans, len(a.tokens), policy.epic_k) & m
              for a, m in zip(agents, shared, strict=True)]
    dev, norm = self.deviation(agents)  # [t] each, for the concatenated prompts
    agent_ids = np.concatenate([np.full(len(a.tokens), i) for i, a in enumerate(agents)])
    blocks = np.concatenate([a.table.slots(0, len(a.tokens)) // ps for a in agents])
    _, blocks = np.unique(agent_ids * (1 << 20) + blocks, return_inverse=True)
    # the exact head's K/V is what a recompute would give: never a candidate, even when the
    # budget (a fraction of all shared tokens) exceeds the tokens past it
    candidate = np.concatenate([m & (np.arange(len(m)) >= a.exact_head)
                                for a, m in zip(agents, shared, strict=True)])
    t = bucket(len(candidate), 16)
    pad = lambda x, v=0: np.pad(x, (0, t - len(x)), constant_values=v)  # noqa: E731
    budget = np.array([selection.budget(int(m.sum()), policy.recompute) for m in shared],
                      np.int32)
    by_block = policy.select == "block"
    if stats is not None:
      stats["deviation"] = collector.deviation_profile(dev, norm, candidate,
                                                       blocks if by_block else None)
    tau = -1.0 if policy.tau is None else float(policy.tau)
    mask = collector.select_tokens(
        pad(dev), pad(norm), pad(agent_ids).astype(np.int32), pad(blocks).astype(np.int32),
        pad(candidate, False), budget, np.float32(tau), num_agents=len(agents),
        by_block=by_block)
    mask = np.asarray(mask)[: len(candidate)]  # the one host sync of the collector
    return np.split(mask, np.cumsum([len(a.tokens) for a in agents])[:-1])

  def exact_head(self, a: AgentState) -> int:
    """`selection.exact_head` of the agent against the session's masters."""
    return selection.exact_head(a.seg_spans, a.tokens, self.ctx.masters.masters)

  def deviation(self, agents: list[AgentState]) -> tuple[np.ndarray, np.ndarray]:
    """Batched check at the check layer past each agent's exact head: (squared deviation of fresh
    from reused keys, squared norm of the reused key), each [t].

    Each agent's exact head (e.g. the system prompt and world state every prompt starts
    with) is not recomputed: its pages' first layers are copied once into the scratch
    cache, where every agent's check reads them, and its deviation is 0.
    """
    ctx = self.ctx
    engine, ps, layer = ctx.engine, ctx.page_size, ctx.policy.check_layer
    scratch_of: dict[int, int] = {}  # main-cache page of an exact head -> its scratch copy
    tables = []
    for a in agents:
      a.exact_head = self.exact_head(a)
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
      scratch = collector.copy_layers(scratch, engine.cache, pad_pages(src, NULL_PAGE),
                                      pad_pages(dst, scratch.num_pages))
    devs, norms = [], []
    sizes = [len(a.tokens) - a.exact_head for a in agents]
    for group in selection.token_groups(sizes, engine.max_prefill_tokens):
      chunks = [(tables[i], agents[i].tokens, np.arange(agents[i].exact_head,
                                                        len(agents[i].tokens))) for i in group]
      batch, *_ = build_batch(chunks)
      reuse = np.full(batch.tokens.shape[0], -1, np.int32)
      cursor = 0
      for i in group:
        a, h, n = agents[i], agents[i].exact_head, len(agents[i].tokens)
        reuse[cursor:cursor + n - h] = np.where(a.shared_mask[h:], a.table.slots(h, n), -1)
        cursor += n - h
      plan = self._scratch_plan()
      if plan is not None:
        batch, reuse = plan.shard_batch(batch), plan.shard_tokens(reuse)
      check = engine.jitted(collector.check_deviation, 2, self._scratch_sharding(), plan)
      dev, norm, scratch = check(engine.params, scratch, engine.cache.k[layer], batch, reuse,
                                 cfg=ctx.cfg, attn=engine.attn, check_layer=layer)
      dev, norm, cursor = np.asarray(dev), np.asarray(norm), 0
      for i in group:  # the exact head: deviation 0, its keys' norms not needed
        h, n = agents[i].exact_head, len(agents[i].tokens)
        devs.append(np.concatenate([np.zeros(h, np.float32), dev[cursor:cursor + n - h]]))
        norms.append(np.concatenate([np.zeros(h, np.float32), norm[cursor:cursor + n - h]]))
        cursor += n - h
    self.scratch = scratch
    return np.concatenate(devs), np.concatenate(norms)

  def copy_on_write(self, agents: list[AgentState], selected: list[np.ndarray]) -> int:
    """Give each agent its own page for every master block it recomputes any token of;
    returns the pages copied (partly recomputed blocks)."""
    alloc, src, dst = self.ctx.allocator, [], []
    for a, sel in zip(agents, selected, strict=True):
      for b, keep_rest in selection.copy_on_write_plan(a.table, sel, a.shared_blocks()):
        master, own = a.table.pages[b], alloc.alloc(1, a.table.shard)[0]
        if keep_rest:  # a partly recomputed block keeps the rest of the master's K/V
          src.append(master)
          dst.append(own)
        a.table.pages[b] = own
        alloc.free([master])
        a.mirror_blocks.add(b)
    self.ctx.copy(src, dst)
    return len(src)

  def _scratch_cache(self, pages: int) -> model.KVCache:
    ctx = self.ctx
    pages = bucket(pages, 64)
    if self.scratch is not None and self.scratch.k.is_deleted():
      self.scratch = None  # donated to a check that failed; it holds nothing to keep
    if self.scratch is None or self.scratch.num_pages < pages:
      sub = dataclasses.replace(ctx.cfg, n_layers=ctx.policy.check_layer + 1)
      sub_pool = dataclasses.replace(ctx.cache_cfg, num_pages=pages)
      plan = self._scratch_plan()
      self.scratch = (model.KVCache.create(sub, sub_pool) if plan is None
                      else plan.create_cache(sub, sub_pool))
    return self.scratch

  def _scratch_plan(self):
    """The engine's mesh plan with the whole scratch cache on every `data` shard: its page
    ids are the check's own, not the pool's shards (the check's reads of the pool are
    XLA's gathers)."""
    plan = self.ctx.engine.mesh_plan
    return None if plan is None else plan.with_replicated_pool()

  def _scratch_sharding(self):
    ctx = self.ctx
    plan = self._scratch_plan()
    if plan is None:
      return None
    sub_pool = dataclasses.replace(ctx.cache_cfg, num_pages=self.scratch.num_pages)
    return plan.cache_sharding(ctx.cfg, sub_pool, n_layers=ctx.policy.check_layer + 1)
