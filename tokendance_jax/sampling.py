"""Token sampling on device: greedy, temperature, top-k, top-p, per-row and seeded.

Every row carries its own parameters, so one jit-compiled step serves a batch
of requests with different settings. A row's random key is derived from its
seed and its own step count, so its samples do not depend on which other
requests share the batch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingParams:
  """How one request is decoded. temperature 0 means greedy."""

  max_tokens: int = 64
  temperature: float = 0.0
  top_k: int = 0  # 0: off
  top_p: float = 1.0  # 1.0: off
  seed: int = 0
  stop_token_ids: tuple[int, ...] = ()
  ignore_eos: bool = False

  def __post_init__(self):
    if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
      raise ValueError(f"max_tokens={self.max_tokens!r}; must be a positive integer")
    if not 0.0 <= self.temperature <= 100.0:
      raise ValueError(f"temperature={self.temperature!r}; must be in [0, 100]")
    if self.top_k < 0:
      raise ValueError(f"top_k={self.top_k!r}; must be >= 0")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p={self.top_p!r}; must be in (0, 1]")
    if not 0 <= self.seed < 2**32:
      raise ValueError(f"seed={self.seed!r}; must be in [0, 2**32)")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingArrays:
  """Per-row sampling parameters as device arrays."""

  temperature: jax.Array  # [b] float32
  top_k: jax.Array  # [b] int32
  top_p: jax.Array  # [b] float32
  seed: jax.Array  # [b] uint32
  step: jax.Array  # [b] int32 tokens this row has sampled so far

  @classmethod
  def from_params(cls, params: list[SamplingParams | None], steps: list[int], rows: int):
    """Pad to `rows`; None entries (padding rows) decode greedily."""
    def col(fn, dtype, fill):
      out = np.full(rows, fill, dtype)
      out[: len(params)] = [fn(p) if p is not None else fill for p in params]
      return out

    step = np.zeros(rows, np.int32)
    step[: len(steps)] = steps
    return cls(
        temperature=col(lambda p: p.temperature, np.float32, 0.0),
        top_k=col(lambda p: p.top_k, np.int32, 0),
        top_p=col(lambda p: p.top_p, np.float32, 1.0),
        seed=col(lambda p: p.seed, np.uint32, 0),
        step=step,
    )


def _sample_stochastic(logits, s: SamplingArrays):
  """logits: [b, v] float32 -> [b] int32 under temperature / top-k / top-p."""
  vocab = logits.shape[-1]
  order = jnp.argsort(-logits, axis=-1)  # [b, v] descending
  ranked = jnp.take_along_axis(logits, order, axis=-1)
  scaled = ranked / jnp.maximum(s.temperature, 1e-6)[:, None]
  rank = jnp.arange(vocab)[None, :]
  keep = (s.top_k[:, None] <= 0) | (rank < s.top_k[:, None])
  probs = jax.nn.softmax(jnp.where(keep, scaled, -jnp.inf), axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before each token
  keep &= before < s.top_p[:, None]  # the top token always survives
  keys = jax.vmap(lambda seed, step: jax.random.fold_in(jax.random.key(seed), step))(s.seed, s.step)
  choice = jax.vmap(jax.random.categorical)(keys, jnp.where(keep, scaled, -jnp.inf))
  return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def sample(logits: jax.Array, s: SamplingArrays) -> jax.Array:
  """logits: [b, v] -> token ids [b] int32; rows with temperature 0 are greedy."""
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  stochastic = jax.lax.cond(
      jnp.any(s.temperature > 0), lambda: _sample_stochastic(logits, s), lambda: greedy)
  return jnp.where(s.temperature > 0, stochastic, greedy)
