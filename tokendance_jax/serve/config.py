"""`ServerConfig`: the knobs of one server (the `tokendance serve` flags map onto its fields)."""

from __future__ import annotations

import dataclasses

from tokendance_jax.rounds import ReusePolicy

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


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
  # Chat requests whose messages mark segments with <|td:shared|> / <|td:private|> run on one
  # long-lived tokendance session: a shared segment seen before is reused, not prefilled.
  chat_reuse_pages: int = 256
  chat_select: str = "block"
  chat_recompute: float = 0.05
  chat_masters: str = "context"  # how masters of marked spans are made (ReusePolicy.masters)

  def __post_init__(self):
    if self.max_queue < 0 or self.session_pages < 2 or self.max_sessions < 0:
      raise ValueError(f"max_queue={self.max_queue} must be >= 0, session_pages="
                       f"{self.session_pages} >= 2, max_sessions={self.max_sessions} >= 0")
    if self.snapshot_keep < 1:
      raise ValueError(f"snapshot_keep={self.snapshot_keep} must be >= 1")
    if self.chat_reuse_pages < 2:
      raise ValueError(f"chat_reuse_pages={self.chat_reuse_pages} must be >= 2")
    ReusePolicy(select=self.chat_select, recompute=self.chat_recompute,
                masters=self.chat_masters)  # checks all three
