"""`ServerConfig`: the knobs of one server (the `tokendance serve` flags map onto its fields)."""

from __future__ import annotations

import dataclasses

from tokendance_jax.chunking import ChunkConfig
from tokendance_jax.rounds import ReusePolicy

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
REUSE_MODES = ("none", "prefix", "tokendance")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServerConfig:
  """Knobs of one server (see `serve` for the command-line defaults)."""

  model_name: str = DEFAULT_MODEL_NAME
  api_key: str | None = None
  max_queue: int = 256  # requests waiting beyond the engine's running batch
  session_pages: int = 256  # page pool of each session
  max_sessions: int = 8
  max_agents: int = 32
  default_max_tokens: int = 256  # chat requests without max_tokens
  max_body_bytes: int = 1 << 20
  retry_after_s: int = 1
  state_dir: str | None = None  # session snapshots (orbax): restored on start, saved on shutdown
  snapshot_keep: int = 2
  # How requests reuse K/V, all on the engine's one page pool: "none"; "prefix" (automatic
  # prefix caching, the default); "tokendance" (prefix caching, and chat requests waiting
  # together are prefilled in one collective step, their shared spans found by
  # content-defined chunks and read from masters; marked spans are shared as marked). Not
  # the default: on benchmarks/agents_client.py it computes 18-30% fewer tokens than
  # "prefix" at 30% recompute, but its greedy outputs match no reuse on 87-92% of tokens
  # only, where prefix caching matches all (README, Serving).
  reuse: str = "prefix"
  gather_ms: float = 50.0  # a chat's step waits until no other chat arrived for this long
  # content-defined chunks: a boundary every ~chunk_avg tokens past chunk_min, at most
  # chunk_max apart (16 / 16: the best hit rate per KV page in benchmarks/chunk_sweep.py)
  chunk_avg: int = 16
  chunk_min: int = 16
  chunk_max: int = 256
  chat_select: str = "block"
  # 30% of shared tokens recomputed, and the last 64 prompt tokens always computed: on the
  # client benchmark's prompts 10% kept 40-66% of no-reuse's greedy tokens, 30% 87-92%
  # (nearly every prompt is shared text there)
  chat_recompute: float = 0.30
  chat_private_tail: int = 64
  chat_masters: str = "context"  # how masters of shared spans are made (ReusePolicy.masters)

  def __post_init__(self):
    if self.max_queue < 0 or self.session_pages < 2 or self.max_sessions < 0:
      raise ValueError(f"max_queue={self.max_queue} must be >= 0, session_pages="
                       f"{self.session_pages} >= 2, max_sessions={self.max_sessions} >= 0")
    if self.snapshot_keep < 1:
      raise ValueError(f"snapshot_keep={self.snapshot_keep} must be >= 1")
    if self.reuse not in REUSE_MODES:
      raise ValueError(f"reuse={self.reuse!r}; expected one of {', '.join(REUSE_MODES)}")
    if not 0 <= self.gather_ms <= 10_000:
      raise ValueError(f"gather_ms={self.gather_ms} must be in [0, 10000]")
    self.chunk_config()  # checks the chunk sizes
    self.reuse_policy()  # checks select, recompute and masters
    if self.chat_private_tail < 0:
      raise ValueError(f"chat_private_tail={self.chat_private_tail} must be >= 0")

  def chunk_config(self) -> ChunkConfig:
    return ChunkConfig(avg=self.chunk_avg, min_len=self.chunk_min, max_len=self.chunk_max)

  def reuse_policy(self) -> ReusePolicy:
    return ReusePolicy(select=self.chat_select, recompute=self.chat_recompute,
                       masters=self.chat_masters)
