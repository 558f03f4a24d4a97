"""One completion in flight (`Completion`) and the text rules of its stream: where a stop
string cuts it (`find_stop`) and what may be sent before the end (`stable_prefix`)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

from tokendance_jax.implicit import Request
from tokendance_jax.sampling import SamplingParams

__all__ = ["Completion", "find_stop", "stable_prefix"]


@dataclasses.dataclass
class Completion:
  """A request in the engine; the worker pushes ("delta", text) / ("done", info) events."""

  prompt: list[int]
  params: SamplingParams
  stop: tuple[str, ...]
  events: asyncio.Queue
  seq: Any = None
  sent: str = ""
  counted: int = 0  # generated tokens already added to the metrics
  done: bool = False
  cancelled: bool = False
  request: Request | None = None  # a chat for the collective step (reuse "tokendance")
  agent: Any = None  # its AgentState once prefilled: the worker releases its table at the end
  cached_tokens: int | None = None  # prompt tokens not computed (None: read from `seq`)
  arrived: float = dataclasses.field(default_factory=time.monotonic)  # when it was submitted
  reuse: dict | None = None  # what its collective step did for it (the response's "tokendance")


def find_stop(text: str, stops: tuple[str, ...]) -> int | None:
  hits = [i for i in (text.find(s) for s in stops) if i >= 0]
  return min(hits) if hits else None


def stable_prefix(text: str, stops: tuple[str, ...]) -> str:
  """What may be sent before the end: no trailing partial UTF-8 char, no partial stop string."""
  text = text.rstrip("\ufffd")
  hold = max((len(s) for s in stops), default=1) - 1
  return text[:len(text) - hold] if hold else text
