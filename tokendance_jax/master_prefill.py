"""Stage 2 of a round: prefill the masters of the round's shared segments that have none.

`masters` plans (the consensus order, the windows, the common prefix); this
stage runs those plans on the engine and registers the results in the
`diffstore.MasterRegistry`, per `ReusePolicy.masters`:

- "context": `masters.context_plan` sequences, one prefill each; segments
  that already have masters are read through their pages.
- "anchored" / "decode": the segment every prompt starts with alone, then
  each missing segment right after it ("decode" later replaces outputs'
  masters with their authors' decode K/V, in `handover`).

With `keep_masters`, the masters a round uses are pinned (one extra
reference) so the registry's eviction cannot take them mid-round; `unpin`
drops those references. Every page a failed prefill took is freed. On a
sharded pool a master is computed on the shard holding most of the masters
it reads (given a replica of the others there), then the one with the most
free pages; other shards get replicas when their agents read it.
"""

from __future__ import annotations

import numpy as np

from tokendance_jax import masters
from tokendance_jax.paging import BlockTable, pages_needed
from tokendance_jax.rounds import Round, Segment, segment_key

__all__ = ["MasterBuilder"]


class MasterBuilder:
  """Makes and pins a session's masters (see the module docstring)."""

  def __init__(self, ctx, keep_masters: bool):
    self.ctx, self.keep_masters = ctx, keep_masters
    self.pinned: list[int] = []  # master pages held for the round in flight (keep_masters)

  def build(self, rnd: Round, stats: dict) -> None:
    """Masters for the round's shared segments that have none, per `policy.masters`."""
    ctx, registry = self.ctx, self.ctx.masters
    if self.keep_masters:  # the round's masters must not be evicted while it runs
      self.pin([k for k in rnd.shared_segments() if k in registry])
    missing = [s for k, s in rnd.shared_segments().items() if k not in registry]
    if not missing:
      return
    with ctx.phase(stats, "master_prefill"):
      if ctx.policy.masters == "context":
        for seq in masters.context_plan(rnd, registry.__contains__, ctx.cfg.max_seq_len):
          stats["master_tokens"] += self.in_context(seq)
        return
      anchor = next(iter(masters.common_prefix(rnd)), None)  # e.g. the system prompt
      if anchor is not None and anchor.key not in registry:
        self.standalone([anchor], None)  # position 0 in every prompt: exact
        stats["master_tokens"] += len(anchor)
        missing = [s for s in missing if s.key != anchor.key]
      self.standalone(missing, anchor)
      stats["master_tokens"] += sum(len(s) for s in missing)

  def in_context(self, seq: masters.MasterSequence) -> int:
    """One prefill of `seq`: its computed segments become masters; returns tokens computed.

    Segments that already have masters are listed through their pages and
    read as context; the others get fresh pages. A new master records the
    tokens it was computed after (`Master.context`) only while every master
    read before it is itself exact at its place here; after one that is not,
    its K/V is not what a prompt with the same tokens computes, so its
    context is None. On failure every page taken here is freed.
    """
    ctx, alloc = self.ctx, self.ctx.allocator
    shard = ctx.shard_for([seg.key for seg, c in zip(seq.segments, seq.compute, strict=True)
                          if not c])
    table, tokens, positions, made = BlockTable(ctx.page_size, shard), [], [], []
    exact = True
    try:
      for seg, compute in zip(seq.segments, seq.compute, strict=True):
        if compute:
          pages = alloc.alloc(pages_needed(len(seg), ctx.page_size), shard)
          made.append((seg, len(table.pages), len(pages), exact))
          positions.append(np.arange(len(tokens), len(tokens) + len(seg)))
        else:
          m = ctx.masters.get(seg.key)
          exact = exact and m.context is not None and m.context == segment_key(tokens)
          pages = list(m.on(shard))
          alloc.share(pages)
        table.append_segment(pages, len(seg))
        tokens += seg.tokens
      ctx.run([(table, tokens, np.concatenate(positions))], want_logits=False)
      for seg, b0, n, exact_here in made:
        pages = table.pages[b0:b0 + n]
        alloc.share(pages)  # the registry's reference
        ctx.masters.add(seg.key, seg.tokens, pages, source="context",
                        context=segment_key(tokens[:table.starts[b0]]) if exact_here else None)
    finally:
      table.release(alloc)
    if self.keep_masters:
      self.pin([seg.key for seg, *_ in made])
    return sum(len(seg) for seg, *_ in made)

  def standalone(self, segs: list[Segment], anchor: Segment | None) -> None:
    """Masters for `segs`, each prefilled alone or right after the `anchor` master's tokens."""
    if not segs:
      return
    ctx, alloc = self.ctx, self.ctx.allocator
    shard = ctx.shard_for([anchor.key] if anchor is not None else [])
    anchor_m = ctx.masters.get(anchor.key) if anchor is not None else None
    head = tuple(anchor_m.tokens) if anchor_m is not None else ()
    head_pages = list(anchor_m.on(shard)) if anchor_m is not None else []
    exact = anchor_m is None or anchor_m.context == segment_key(())  # the anchor sits at 0
    tables, chunks = [], []
    try:
      for seg in segs:
        table = BlockTable(ctx.page_size, shard)
        tables.append(table)
        if head_pages:
          alloc.share(head_pages)
          table.append_segment(list(head_pages), len(head))
        table.append_segment(alloc.alloc(pages_needed(len(seg), ctx.page_size), shard), len(seg))
        chunks.append((table, list(head) + list(seg.tokens),
                       np.arange(len(head), len(head) + len(seg))))
      ctx.run(chunks, want_logits=False)
      for table, seg in zip(tables, segs, strict=True):
        pages = table.pages[len(head_pages):]
        alloc.share(pages)  # the registry's reference
        ctx.masters.add(seg.key, seg.tokens, pages, source="prefill",
                        context=segment_key(head) if exact else None)
    finally:
      for table in tables:
        table.release(alloc)
    if self.keep_masters:
      self.pin([s.key for s in segs])

  def pin(self, keys) -> None:
    """Hold one more reference on the masters `keys` until `unpin`."""
    pages = [p for k in keys for p in self.ctx.masters.get(k).pages]
    self.ctx.allocator.share(pages)
    self.pinned += pages

  def unpin(self) -> None:
    self.ctx.allocator.free(self.pinned)
    self.pinned = []
