"""One generation request as the engine tracks it, and what the engine reports back.

A `Sequence` owns a block table; its `tokens` are prompt plus generated ids
and `num_computed` of them have K/V in the cache (see `engine.Engine`).
"""

from __future__ import annotations

import dataclasses

from tokendance_jax.paging import BlockTable
from tokendance_jax.sampling import SamplingParams

__all__ = ["CacheLost", "GenerationResult", "Sequence"]


@dataclasses.dataclass
class Sequence:
  seq_id: int
  prompt: list[int]
  params: SamplingParams
  table: BlockTable
  tokens: list[int]
  num_computed: int = 0
  finish_reason: str | None = None
  retain: bool = False  # keep the pages when finished (the caller takes them over)
  keep_blocks: int = 0  # leading blocks a preemption leaves in place (an adopted prompt)
  cached_tokens: int = 0  # leading prompt tokens whose K/V came from the prefix cache
  cached_blocks: int = 0  # leading blocks taken from the prefix cache
  inserted_blocks: int = 0  # leading blocks already offered to the prefix cache
  chain_key: str | None = None  # the prefix-cache key of block inserted_blocks - 1, if known

  @property
  def output(self) -> list[int]:
    return self.tokens[len(self.prompt):]

  @property
  def pending(self) -> int:
    return len(self.tokens) - self.num_computed


class CacheLost(RuntimeError):
  """A step failed after the KV cache was donated to it, so every page's K/V is gone.

  The engine starts again on an empty pool of the same shape and aborts the
  sequences it was running or holding (`seq_ids`). Whoever keeps page
  contents across steps (masters, a prefix cache) must drop them: their
  pages are still allocated but hold zeros now.
  """

  def __init__(self, seq_ids: list[int], cause: BaseException):
    super().__init__(f"a model step failed after the KV cache was donated to it ({cause!r}); "
                     f"the K/V of every page is lost and {len(seq_ids)} sequences were aborted")
    self.seq_ids = seq_ids


@dataclasses.dataclass(frozen=True)
class GenerationResult:
  seq_id: int
  prompt_ids: list[int]
  output_ids: list[int]
  finish_reason: str  # "stop" (EOS / stop token) or "length"
