"""The arrays a model step reads and writes: the paged KV pool and a ragged token batch.

Both are pytrees (frozen dataclasses) so jitted steps take and donate them.
They live apart from `model` so that `sharding` can build them without
importing the model.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from tokendance_jax import kernels
from tokendance_jax.config import CacheConfig, ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Paged K/V for every layer; keys are stored un-rotated."""

  k: jax.Array  # [l, kv_heads, num_pages, page_size, e]
  v: jax.Array  # [l, kv_heads, num_pages, page_size, e]

  @property
  def num_pages(self) -> int:
    return self.k.shape[2]

  @property
  def page_size(self) -> int:
    return self.k.shape[3]

  @classmethod
  def create(cls, cfg: ModelConfig, cache_cfg: CacheConfig) -> KVCache:
    shape = (cfg.n_layers, *kernels.kv_cache_shape(
        cache_cfg.num_pages, cache_cfg.page_size, cfg.n_kv_heads, cfg.head_dim))
    dtype = jnp.dtype(cache_cfg.dtype)
    return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Batch:
  """A ragged batch of tokens from many sequences (padding has position -1).

  Reads go through block_tables / block_pos / block_len (slot i of block j
  of row s is position block_pos[s, j] + i when i < block_len[s, j]); writes
  go to slot_mapping, so a segment can start on a fresh page while positions
  stay contiguous.
  """

  tokens: jax.Array  # [t] int32
  positions: jax.Array  # [t] int32 logical position, -1 for padding
  seq_ids: jax.Array  # [t] int32 row of block_tables
  slot_mapping: jax.Array  # [t] int32 page * page_size + slot to write; -1: write nothing
  block_tables: jax.Array  # [s, pages_per_seq] int32
  block_pos: jax.Array  # [s, pages_per_seq] int32
  block_len: jax.Array  # [s, pages_per_seq] int32
  logits_index: jax.Array  # [n] int32 flat tokens whose logits are returned

  @classmethod
  def contiguous(cls, *, tokens, positions, seq_ids, block_tables, logits_index, page_size: int):
    """Host-side constructor for the default layout: block j holds positions j*page_size.."""
    positions = np.asarray(positions, np.int32)
    seq_ids = np.asarray(seq_ids, np.int32)
    tables = np.asarray(block_tables, np.int32)
    pos = np.maximum(positions, 0)
    pages = tables[seq_ids, pos // page_size]
    slots = np.where(positions >= 0, pages * page_size + pos % page_size, -1).astype(np.int32)
    width = tables.shape[1]
    block_pos = np.broadcast_to(np.arange(width, dtype=np.int32) * page_size, tables.shape)
    return cls(tokens=np.asarray(tokens, np.int32), positions=positions, seq_ids=seq_ids,
               slot_mapping=slots, block_tables=tables, block_pos=np.array(block_pos),
               block_len=np.full(tables.shape, page_size, np.int32),
               logits_index=np.asarray(logits_index, np.int32))
