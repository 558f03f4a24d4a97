"""Round-aware prompts: a prompt is a list of segments; a round is many agents' prompts.

A shared segment is identified by the hash of its token ids, wherever it sits
in a prompt, so the same block at different offsets in different prompts is
recognised as one. A private segment belongs to one agent. Callers that send
flat text mark segments with reserved separator strings (`parse_text`).
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from tokendance_jax.config import ModelConfig

SHARED_MARK = "<|td:shared|>"
PRIVATE_MARK = "<|td:private|>"
# How masters are made (ReusePolicy.masters; see tokendance_jax.masters).
MASTERS = ("context", "anchored", "decode")
# The round methods (see tokendance_jax.session); the reuse methods make masters.
METHODS = ("full", "prefix", "cacheblend", "epic", "tokendance")
REUSE_METHODS = ("cacheblend", "epic", "tokendance")


def segment_key(tokens) -> str:
  """Content hash of a token sequence (independent of where it sits)."""
  return hashlib.blake2b(np.asarray(tokens, np.int32).tobytes(), digest_size=16).hexdigest()


@dataclasses.dataclass(frozen=True)
class Segment:
  """A run of tokens; shared segments are deduplicated by content."""

  tokens: tuple[int, ...]
  shared: bool = False
  name: str = ""

  def __post_init__(self):
    object.__setattr__(self, "tokens", tuple(int(t) for t in self.tokens))

  @property
  def key(self) -> str:
    return segment_key(self.tokens)

  def __len__(self) -> int:
    return len(self.tokens)


@dataclasses.dataclass(frozen=True)
class SegmentRef:
  """A shared segment named by its key (`Segment.key`) instead of its tokens.

  Resolved against the segments a session has seen (earlier rounds' shared
  segments and agents' outputs); an unknown key is an error.
  """

  key: str
  name: str = ""


@dataclasses.dataclass(frozen=True)
class AgentPrompt:
  """One agent's prompt for a round, and how many tokens it may generate."""

  agent_id: str
  segments: tuple[Segment, ...]
  max_tokens: int = 64

  def __post_init__(self):
    object.__setattr__(self, "segments", tuple(self.segments))

  @property
  def tokens(self) -> list[int]:
    return [t for s in self.segments for t in s.tokens]

  @property
  def num_tokens(self) -> int:
    return sum(len(s) for s in self.segments)


@dataclasses.dataclass(frozen=True)
class Round:
  """Agents' prompts released together; the next round starts when all finish."""

  prompts: tuple[AgentPrompt, ...]

  def __post_init__(self):
    object.__setattr__(self, "prompts", tuple(self.prompts))

  def validate(self, cfg: ModelConfig) -> None:
    """Raise ValueError naming the first bad input; nothing is allocated before this."""
    if not self.prompts:
      raise ValueError("round has no agents")
    seen = set()
    for p in self.prompts:
      if p.agent_id in seen:
        raise ValueError(f"duplicate agent id {p.agent_id!r} in one round")
      seen.add(p.agent_id)
      _validate_prompt(p, cfg)

  def resolve(self, known: dict[str, tuple[int, ...]]) -> Round:
    """Replace every SegmentRef by the shared Segment it names; ValueError if unknown."""
    def seg(s, agent):
      if not isinstance(s, SegmentRef):
        return s
      if s.key not in known:
        raise ValueError(f"agent {agent!r}: unknown segment id {s.key!r}")
      return Segment(known[s.key], shared=True, name=s.name)

    return Round([dataclasses.replace(p, segments=[seg(s, p.agent_id) for s in p.segments])
                  for p in self.prompts])

  def shared_segments(self) -> dict[str, Segment]:
    return {s.key: s for p in self.prompts for s in p.segments if s.shared}


def _validate_prompt(p: AgentPrompt, cfg: ModelConfig) -> None:
  if not p.segments:
    raise ValueError(f"agent {p.agent_id!r}: prompt has no segments")
  for i, s in enumerate(p.segments):
    if not s.tokens:
      raise ValueError(f"agent {p.agent_id!r}: segment {i} ({s.name or 'unnamed'}) is empty")
    bad = [t for t in s.tokens if not 0 <= t < cfg.vocab_size]
    if bad:
      raise ValueError(f"agent {p.agent_id!r}: segment {i} has token ids {bad[:5]} outside "
                       f"[0, {cfg.vocab_size})")
  if p.segments[-1].shared:
    raise ValueError(f"agent {p.agent_id!r}: the last segment must be private (its logits "
                     "start the generation)")
  if not isinstance(p.max_tokens, int) or p.max_tokens < 1:
    raise ValueError(f"agent {p.agent_id!r}: max_tokens={p.max_tokens!r} must be >= 1")
  total = p.num_tokens + p.max_tokens
  if total > cfg.max_seq_len:
    raise ValueError(f"agent {p.agent_id!r}: prompt ({p.num_tokens} tokens) + max_tokens "
                     f"({p.max_tokens}) = {total} exceeds the model context {cfg.max_seq_len}")


def parse_text(text: str, encode) -> list[Segment]:
  """Split flat text at SHARED_MARK / PRIVATE_MARK into segments (text before any mark is private).

  `encode` maps text to token ids. Each marker applies to the text up to the
  next marker; empty pieces are dropped.
  """
  segments, shared, pos = [], False, 0
  marks = {SHARED_MARK: True, PRIVATE_MARK: False}
  while pos <= len(text):
    nxt = [(text.find(m, pos), m) for m in marks]
    nxt = [(i, m) for i, m in nxt if i >= 0]
    end, mark = min(nxt) if nxt else (len(text), None)
    piece = text[pos:end]
    if piece:
      segments.append(Segment(tuple(encode(piece)), shared=shared))
    if mark is None:
      break
    shared, pos = marks[mark], end + len(mark)
  if not segments:
    raise ValueError("text holds no segment")
  return segments


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReusePolicy:
  """How shared blocks are reused: where masters come from and which tokens to recompute.

  select: "block" (default: whole pages ranked by summed key deviation at
  `check_layer`, taken until `recompute` of the agent's shared tokens are
  covered; mirrors stay page-sparse), "cacheblend" (the top `recompute`
  fraction of shared tokens by deviation), "epic" (the first `epic_k`
  tokens of each reused block). Private tokens are always recomputed. The
  defaults (block, 5%, context masters) are the cheapest setting measured
  to hold the quality bar on agent_society (README, Results).

  tau: None (default) recomputes a fixed `recompute` fraction of each agent's
  shared tokens. A number switches to the threshold mode: only tokens (or
  pages, for "block") whose key deviation at the check layer exceeds `tau`
  relative to the key's norm (||k_fresh - k_master|| > tau * ||k_master||)
  are recomputed, highest first, capped at the `recompute` fraction; agents
  whose masters are already close then recompute less.

  masters: how masters are made (see `tokendance_jax.masters`). "context"
  (default): all of a round's shared segments without a master are prefilled
  as one sequence, in the order most prompts hold them, after the masters
  they follow. "anchored": each alone, right after the segment every prompt
  starts with (the system prompt). "decode": as "anchored", but an agent's
  output reuses the K/V its author wrote while decoding it (free, computed in
  the author's own context).
  """

  select: str = "block"
  recompute: float = 0.05
  check_layer: int = 1
  epic_k: int = 16
  tau: float | None = None
  masters: str = "context"

  def __post_init__(self):
    if self.select not in ("cacheblend", "block", "epic"):
      raise ValueError(f"select={self.select!r}; expected cacheblend, block or epic")
    if not 0.0 <= self.recompute <= 1.0:
      raise ValueError(f"recompute={self.recompute!r}; must be in [0, 1]")
    if self.check_layer < 0:
      raise ValueError(f"check_layer={self.check_layer!r}; must be >= 0")
    if self.masters not in MASTERS:
      raise ValueError(f"masters={self.masters!r}; expected one of {', '.join(MASTERS)}")
    if self.epic_k < 0:
      raise ValueError(f"epic_k={self.epic_k!r}; must be >= 0")
    if self.tau is not None:
      if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or not (
          0.0 <= self.tau < float("inf")):
        raise ValueError(f"tau={self.tau!r}; must be a finite number >= 0 (or None)")
      if self.select == "epic":
        raise ValueError("tau: the threshold mode ranks by deviation; select epic has none")
