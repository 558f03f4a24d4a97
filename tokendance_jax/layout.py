"""Stage 4 of a round: each agent's block table, segment by segment.

Every prompt is laid out segment by segment, each segment on its own pages
and positions contiguous, so a shared segment's pages can be listed in any
agent's block table at that agent's offset. Which pages a segment gets is
the method's choice (`methods.Method.segment_pages`): a master's pages
(tokendance), a dense copy's (per-request PIC), prefix-cache hits, or fresh
pages. A layout that fails halfway gives back every page it took.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from tokendance_jax.paging import BlockTable, PageAllocator, pages_needed
from tokendance_jax.rounds import AgentPrompt, Segment

__all__ = ["AgentState", "block_tokens", "layout_wave", "release"]


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
    """Block indices of the agent's shared segments."""
    out = set()
    for _, b0, seg in self.seg_spans:
      if seg.shared:
        out.update(range(b0, b0 + pages_needed(len(seg), self.table.page_size)))
    return out

  def shared_spans(self):
    """(first block, block count, segment) of each shared segment."""
    for _, b0, seg in self.seg_spans:
      if seg.shared:
        yield b0, pages_needed(len(seg), self.table.page_size), seg


def block_tokens(prompt: AgentPrompt, page_size: int) -> list[tuple[int, ...]]:
  """The prompt's token blocks in the segment layout."""
  out = []
  for seg in prompt.segments:
    out += [seg.tokens[i:i + page_size] for i in range(0, len(seg), page_size)]
  return out


def release(agents: list[AgentState], allocator: PageAllocator) -> None:
  """Drop every reference the agents' tables hold."""
  for a in agents:
    a.table.release(allocator)


def layout_wave(prompts, method, ctx, shards: list[int] | None = None) -> list[AgentState]:
  """Block tables for a wave's prompts, prompt i's on pool shard shards[i] (default 0),
  after replicas of the masters they read are placed on their shards; on failure every
  page the tables took is released (the replicas stay with their masters)."""
  agents: list[AgentState] = []
  shards = shards or [0] * len(prompts)
  if method.reuses_masters:  # each agent reads the masters' replicas on its own shard
    ctx.place_replicas([(seg.key, shard) for p, shard in zip(prompts, shards, strict=True)
                        for seg in p.segments if seg.shared])
  try:
    for p, shard in zip(prompts, shards, strict=True):
      agents.append(_layout(p, method, ctx, shard))
  except BaseException:
    release(agents, ctx.allocator)
    raise
  return agents


def _layout(prompt: AgentPrompt, method, ctx, shard: int) -> AgentState:
  a = AgentState(prompt.agent_id, prompt.tokens, prompt.max_tokens,
                 BlockTable(ctx.page_size, shard), [], num_prompt=prompt.num_tokens)
  hits = method.layout_hits(prompt, ctx, shard)  # leading pages computed (prefix caching)
  n_hits = len(hits)
  try:
    pos = 0
    for seg in prompt.segments:
      a.seg_spans.append((pos, len(a.table.pages), seg))
      a.table.append_segment(method.segment_pages(seg, hits, ctx, shard), len(seg))
      pos += len(seg)
  except BaseException:
    a.table.release(ctx.allocator)
    ctx.allocator.free(hits)
    raise
  a.compute_from = a.table.starts[n_hits] if n_hits else 0
  return a
