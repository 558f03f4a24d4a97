"""Implicit rounds: requests that arrive together are reused in one collective step.

Apps that talk to the OpenAI API mark nothing: each agent sends its own chat, and the
other agents' outputs sit somewhere inside it. `ImplicitRounds.prefill` takes the
requests waiting when the server runs a prefill step and treats them as one round:

1. segments (`segments`): each prompt is cut into content-defined chunks
   (`chunking`), with forced cuts where each message begins (`message_cuts`). A
   chunk is shared when the registry holds a master of it that serves the prompt, or
   when it has none and occurs twice or more among the step's prompts; the others are
   private. Chunks shorter than `min_len` stay private, except the prompt's head
   (the first message's start): shared, its master is exact, so the system prompt's
   masters after it are too, and the check and the selection skip them. Chunks
   ending in the last `private_tail` tokens are always private: the tokens nearest
   the generation weigh most on it (the client benchmark's outputs diverged at 10%
   recompute without it).
   Marked prompts bring their own segments.
2. the collective step (`RoundSession.prefill_wave` on the server engine's own pool):
   masters for the shared chunks that have none, made once in context, then the KV
   Collector's check, selection, copy-on-write and recompute for every agent in one
   batch. Prompts that do not fit the pool wait for the next step.
3. hand-over: each private chunk without a master whose K/V is exact (every token
   before it is) becomes one; the registry shares its pages. Such a master was
   computed after its request's own tokens, so it serves only a later prompt holding
   those same tokens before it (e.g. the next request with the same system prompt);
   another prompt computes the chunk itself. Each agent is adopted by the engine,
   which decodes it continuously batched with every other request.

`release` drops an agent's table when its request ends. Masters stay until the pool
runs short; then those no table reads are evicted, least recently used first.
"""

from __future__ import annotations

import collections
import dataclasses

from tokendance_jax.chunking import ChunkConfig, chunk_spans
from tokendance_jax.engine import Engine, Sequence
from tokendance_jax.layout import AgentState, release
from tokendance_jax.paging import pages_needed
from tokendance_jax.rounds import AgentPrompt, ReusePolicy, Round, Segment, segment_key
from tokendance_jax.sampling import SamplingParams
from tokendance_jax.session import RoundSession

__all__ = ["Admitted", "ImplicitRounds", "Request", "message_cuts", "message_openers",
           "no_masters", "segments"]


@dataclasses.dataclass
class Request:
  """One prompt for a collective step: ids and forced chunk cuts, or explicit segments."""

  ids: list[int]
  params: SamplingParams
  cuts: tuple[int, ...] = ()  # forced chunk boundaries (`message_cuts`)
  segments: list[Segment] | None = None  # marked by the client: used as they are


@dataclasses.dataclass
class Admitted:
  """A request prefilled by a collective step and adopted by the engine for decode."""

  index: int  # into the step's requests
  agent: AgentState
  seq: Sequence
  computed_tokens: int  # prompt tokens computed for it (recompute + masters it first held)
  chunk_hit_tokens: int  # prompt tokens read from masters that existed before the step

  @property
  def reused_tokens(self) -> int:
    return self.agent.num_prompt - self.computed_tokens


def message_openers(tok) -> frozenset[int]:
  """The control id that opens each message of `tok`'s chat template (empty if none does).

  It is the first control id of a one-message chat that occurs once more in a two-message
  chat: <|im_start|> in ChatML, <|start_header_id|> in Llama 3's template.
  """
  special = set(getattr(tok, "special_ids", ()))

  def render(contents):
    return tok.encode_parts(tok.chat_parts([{"role": "user", "content": c} for c in contents]))

  one, two = render(["a"]), render(["a", "b"])
  per_message = [t for t in one if t in special and two.count(t) == one.count(t) + 1]
  return frozenset(per_message[:1])


def message_cuts(ids: list[int], openers: frozenset[int]) -> tuple[int, ...]:
  """Offsets where a message begins (before each of `openers`): a chunk never straddles two
  messages, so a message, its template markers included, is chunked the same in every chat
  holding it."""
  return tuple(i for i, t in enumerate(ids) if t in openers)


def no_masters(key: str, ids: list[int], start: int) -> None:
  """`segments`' lookup for an empty registry."""
  return None


def segments(requests: list[Request], lookup, cfg: ChunkConfig,
             private_tail: int = 0) -> list[list[Segment]]:
  """Each request's segments (stage 1; see the module docstring).

  `lookup(key, ids, start)` says what the registry holds for the chunk `key` at
  `ids[start:]`: None, no master; True, a master that serves this prompt; False, a master
  that must not (a request's own chunk, computed after tokens this prompt does not hold
  before it): the chunk stays private here. Chunks that end in the last `private_tail`
  tokens stay private: the tokens nearest the generation weigh most on it, and computing
  them exactly is cheap."""
  spans = [None if r.segments is not None else chunk_spans(r.ids, cfg, r.cuts)
           for r in requests]
  counts = collections.Counter(segment_key(r.ids[a:b]) for r, sp in zip(requests, spans,
                                                                          strict=True)
                               if sp is not None for a, b in sp)
  out = []
  for r, sp in zip(requests, spans, strict=True):
    if sp is None:
      out.append(list(r.segments))
      continue
    segs = []
    for i, (a, b) in enumerate(sp):
      tokens = tuple(r.ids[a:b])
      key = segment_key(tokens)
      # a short chunk is not worth a page of its own, except the prompt's head (the first
      # message's start): shared, its master is exact, and so is every master after it
      # made in that same context (the check and the selection skip them)
      shared = (i < len(sp) - 1 and b <= len(r.ids) - private_tail
                and (b - a >= cfg.min_len or a == 0))
      if shared:
        serves = lookup(key, r.ids, a)
        shared = serves if serves is not None else counts[key] > 1
      if not shared and segs and not segs[-1].shared and b - a < cfg.min_len:
        segs[-1] = Segment(segs[-1].tokens + tokens)  # a short private tail joins the run
      else:
        segs.append(Segment(tokens, shared=shared))
    out.append(segs)
  return out


class ImplicitRounds:
  """Collective reuse steps on a server's engine (see the module docstring)."""

  def __init__(self, engine: Engine, policy: ReusePolicy = ReusePolicy(),
               chunks: ChunkConfig = ChunkConfig(), private_tail: int = 64):
    if private_tail < 0:
      raise ValueError(f"private_tail={private_tail} must be >= 0")
    self.engine, self.chunks, self.private_tail = engine, chunks, private_tail
    self.rs = RoundSession(engine.params, engine.cfg, method="tokendance", policy=policy,
                           engine=engine, quality=False, keep_masters=True)
    self.step_sizes: list[int] = []  # requests admitted by each collective step

  @property
  def masters(self):
    return self.rs.masters

  def prefill(self, requests: list[Request]) -> list[Admitted]:
    """One collective step for as many of `requests` as fit; the others wait for the next
    (their `index` is missing from the result). ValueError for a bad prompt (nothing
    admitted), OutOfPages when the first prompt cannot fit even alone."""
    registry = self.rs.masters
    known = set(registry.masters)
    segs = segments(requests, self._lookup, self.chunks, self.private_tail)
    rnd = Round([AgentPrompt(f"r{i}", s, max_tokens=r.params.max_tokens)
                 for i, (r, s) in enumerate(zip(requests, segs, strict=True))])
    wave, agents, first, stats = self.rs.prefill_wave(rnd, [r.params for r in requests])
    made = self._master_tokens(wave, segs, known, stats["master_tokens"])
    out = []
    for j, (i, a, tok) in enumerate(zip(wave, agents, first, strict=True)):
      self._register_private(a)
      hits = sum(len(s) for s in segs[i] if s.shared and s.key in known)
      seq = self.engine.adopt(a.tokens, a.table, tok, requests[i].params)
      out.append(Admitted(i, a, seq, len(a.recompute) + made[j], hits))
    self.step_sizes.append(len(out))
    return out

  def release(self, agent: AgentState) -> None:
    """Drop the agent's table (its request ended); masters keep their own references."""
    release([agent], self.engine.allocator)

  def _master_tokens(self, wave, segs, known, total: int) -> list[int]:
    """Tokens of the masters made this step, each counted for the first admitted request
    that holds its chunk (`total`, the builder's count, is split by those lengths)."""
    made, owner = [0] * len(wave), {}
    for j, i in enumerate(wave):
      for s in segs[i]:
        if s.shared and s.key not in known and s.key not in owner:
          owner[s.key] = j
          made[j] += len(s)
    counted = sum(made)
    if counted != total and wave:  # masters of prompts that wait: their first holder pays
      made[0] += total - counted
    return made

  def _lookup(self, key: str, ids: list[int], start: int) -> bool | None:
    """`segments`' view of the registry: a request's own chunk serves only a prompt holding
    exactly the tokens it was computed after; every other master serves any prompt."""
    m = self.rs.masters.masters.get(key)
    if m is None:
      return None
    return m.source != "request" or m.context == segment_key(ids[:start])

  def _register_private(self, a: AgentState) -> None:
    """Private chunks of `a` become masters (their K/V is computed, in a's own context).

    Only while every token before the chunk holds exactly what a full prefill computes (a
    private run or the exact head): `Master.context` then names those tokens, and the
    master serves only prompts holding them (`_lookup`): served to other prompts it would
    carry a's own tokens (its persona, say) into theirs.
    """
    registry, alloc, ps = self.rs.masters, self.engine.allocator, self.engine.cache_cfg.page_size
    for p0, b0, seg in a.seg_spans:
      if seg.shared or len(seg) < self.chunks.min_len or seg.key in registry:
        continue
      pages = a.table.pages[b0:b0 + pages_needed(len(seg), ps)]
      exact = all(not s.shared or q + len(s) <= a.exact_head
                  for q, _, s in a.seg_spans if q < p0)
      if not exact:
        continue
      alloc.share(pages)  # the registry's reference
      registry.add(seg.key, seg.tokens, pages, source="request",
                   context=segment_key(a.tokens[:p0]))
