"""The methods a round can run, as strategies behind one interface.

Same engine, same kernels, same pool; what differs is which pages a shared
segment gets, how the wave is prefilled, and what outlives the round:

- `full`: fresh pages for every segment; every prompt token is computed;
  nothing outlives the round.
- `prefix`: prefix-cache hits, then fresh pages; computed from the first
  miss on; the prompt and output blocks stay in the prefix cache.
- `cacheblend` / `epic`: a dense copy of each master in the agent's own
  pages; check and recompute agent by agent; masters stay.
- `tokendance`: the master's own pages (a mirror); one collective check and
  recompute with copy-on-write of the touched blocks; masters stay.

`RoundSession` calls the hooks in round order: `admission` (from `page_needs`)
(admission), `layout_hits` and `segment_pages` (layout), `prefill`, `hand_over`.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from tokendance_jax import diffstore, selection
from tokendance_jax.layout import AgentState, block_tokens
from tokendance_jax.paging import pages_needed
from tokendance_jax.prefix_cache import servable
from tokendance_jax.rounds import METHODS, ReusePolicy, Segment

__all__ = ["Full", "Method", "PerRequestPIC", "Prefix", "TokenDance", "make_method"]


class Method:
  """The `full` method, and the hooks every method overrides (see the module docstring)."""

  name = "full"
  reuses_masters = False  # the round's shared segments get masters (stage 2)

  def __init__(self, policy: ReusePolicy):
    self.policy = policy

  def page_needs(self, prompts, ctx, shard: int = 0) -> list[int]:
    """An upper bound on the fresh pages each prompt takes from pool shard `shard`, for
    admission (cached pages its layout reuses are not counted here; see `admission`)."""
    ps = ctx.page_size
    return [pages_needed(p.max_tokens, ps) + sum(self.segment_need(s, ps) for s in p.segments)
            for p in prompts]

  def segment_need(self, seg: Segment, page_size: int) -> int:
    return pages_needed(len(seg), page_size)

  def admission(self, prompts, ctx, shard: int = 0) -> list[tuple[int, set[int]]]:
    """Per prompt, for admission on pool shard `shard`: (`page_needs`, the cached pages its
    layout will reference (`layout_hits`), which a wave holding the prompt cannot
    reclaim)."""
    return [(need, set()) for need in self.page_needs(prompts, ctx, shard)]

  def layout_hits(self, prompt, ctx, shard: int = 0) -> list[int]:
    """Pages on `shard` of the prompt's leading blocks that are already computed (one
    reference each)."""
    return []

  def segment_pages(self, seg: Segment, hits: list[int], ctx, shard: int = 0) -> list[int]:
    """The pages (on the agent's pool shard) of one segment of its table (one reference
    each)."""
    return ctx.allocator.alloc(pages_needed(len(seg), ctx.page_size), shard)

  def prefill(self, agents: list[AgentState], ctx, collector, stats: dict):
    """Prefill the wave: (first tokens, log-probs [n, vocab] or None)."""
    for a in agents:
      a.recompute = np.arange(a.compute_from, len(a.tokens))
    with ctx.phase(stats, "recompute"):
      return ctx.run([(a.table, a.tokens, a.recompute) for a in agents],
                     want_logits=ctx.want_logits)

  def hand_over(self, a: AgentState, output: list[int], ctx) -> None:
    """Keep what the next round reuses from agent `a` (its K/V is complete)."""


Full = Method


class Prefix(Method):
  """vLLM-style automatic prefix caching across agents and rounds."""

  name = "prefix"

  def page_needs(self, prompts, ctx, shard: int = 0) -> list[int]:
    return [need for need, _ in self.admission(prompts, ctx, shard)]

  def admission(self, prompts, ctx, shard: int = 0) -> list[tuple[int, set[int]]]:
    out = []  # one walk of each prompt's chain gives both
    for p in prompts:
      blocks = block_tokens(p, ctx.page_size)
      hits = ctx.prefix.peek(servable(blocks), shard)
      out.append((pages_needed(p.max_tokens, ctx.page_size) + len(blocks) - len(hits),
                  set(hits)))
    return out

  def layout_hits(self, prompt, ctx, shard: int = 0) -> list[int]:
    return ctx.prefix.match(servable(block_tokens(prompt, ctx.page_size)), shard)

  def segment_pages(self, seg: Segment, hits: list[int], ctx, shard: int = 0) -> list[int]:
    n = pages_needed(len(seg), ctx.page_size)
    fresh = ctx.allocator.alloc(n - min(n, len(hits)), shard)  # before a hit leaves `hits`
    return [hits.pop(0) for _ in range(n - len(fresh))] + fresh

  def hand_over(self, a: AgentState, output: list[int], ctx) -> None:
    """Insert the leading blocks whose K/V are complete into the prefix cache."""
    known, blocks, pages = a.num_prompt + len(output), [], []
    for page, start, length in zip(a.table.pages, a.table.starts, a.table.lens, strict=True):
      if start + length > known:
        break
      blocks.append(tuple(a.tokens[start:start + length]))
      pages.append(page)
    ctx.prefix.insert(blocks, pages)


class _Reuse(Method):
  """Methods that read the round's masters; with `masters="decode"` an output's master is
  the K/V its author wrote while decoding it."""

  reuses_masters = True

  def hand_over(self, a: AgentState, output: list[int], ctx) -> None:
    if output and self.policy.masters == "decode":
      pages = diffstore.output_master_pages(a.table, a.num_prompt, len(output))
      if pages is not None:
        ctx.allocator.share(pages)
        ctx.masters.add(Segment(tuple(output), shared=True).key, output, pages,
                        source="decode")


class PerRequestPIC(_Reuse):
  """Per-request position-independent caching (CacheBlend / EPIC), agent by agent: a dense
  copy of every reused block in the agent's own pages, then check and selective recompute
  for that agent alone."""

  name = "cacheblend"

  def prefill(self, agents: list[AgentState], ctx, collector, stats: dict):
    firsts, logps = [], []
    for a in agents:
      f, lp = collector.collect([a], stats, collective=False)
      firsts += f
      logps.append(lp)
    return firsts, (jnp.concatenate(logps) if ctx.want_logits else None)


class TokenDance(_Reuse):
  """The KV Collector: one batched check, selection and recompute for all agents of the wave;
  agents are mirrors of the masters, with own pages only where they differ."""

  name = "tokendance"

  def page_needs(self, prompts, ctx, shard: int = 0) -> list[int]:
    return [need + selection.max_forked_blocks(p, self.policy, ctx.page_size)  # <= its blocks
            for p, need in zip(prompts, super().page_needs(prompts, ctx, shard),
                               strict=True)]

  def segment_need(self, seg: Segment, page_size: int) -> int:
    return 0 if seg.shared else pages_needed(len(seg), page_size)  # a mirror: forks counted apart

  def segment_pages(self, seg: Segment, hits: list[int], ctx, shard: int = 0) -> list[int]:
    if not seg.shared:
      return super().segment_pages(seg, hits, ctx, shard)
    pages = list(ctx.masters.get(seg.key).on(shard))  # the replica on the agent's shard
    ctx.allocator.share(pages)
    return pages

  def prefill(self, agents: list[AgentState], ctx, collector, stats: dict):
    return collector.collect(agents, stats, collective=True)


def make_method(name: str, policy: ReusePolicy) -> tuple[Method, ReusePolicy]:
  """The strategy for method `name` and the policy it runs with (`epic` selects by EPIC's
  rule; `cacheblend` by deviation)."""
  if name not in METHODS:
    raise ValueError(f"method={name!r}; expected one of {', '.join(METHODS)}")
  if name == "epic":
    policy = dataclasses.replace(policy, select="epic")
  if name == "cacheblend" and policy.select == "epic":
    raise ValueError("method cacheblend selects by deviation; use method epic for --select epic")
  cls = {"full": Full, "prefix": Prefix, "cacheblend": PerRequestPIC, "epic": PerRequestPIC,
         "tokendance": TokenDance}[name]
  method = cls(policy)
  method.name = name
  return method, policy
