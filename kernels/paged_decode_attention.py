"""Paged decode attention: one new query per sequence, GQA, keys rotated in-kernel.

A program per (sequence, KV head) runs the online softmax over the
sequence's pages; the query-head group is padded to 16 rows so the Triton
dot has a legal shape.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import _body
from ._body import DEFAULT_MASK_VALUE, BlockSizes
from .rope import inv_freq as _inv_freq
from .rope import rotate_half_matrix

_MIN_ROWS = 16  # smallest M of a Triton dot


def kv_cache_shape(num_pages: int, page_size: int, kv_heads: int, head_dim: int):
  """The page-pool layout both kernels read: [kv_heads, num_pages, page_size, head_dim]."""
  return (kv_heads, num_pages, page_size, head_dim)


def _check_args(q, k_pages, v_pages, block_tables, positions):
  _body.check_query(q, k_pages, v_pages, "batch")
  if block_tables.shape[:1] != q.shape[:1] or block_tables.ndim != 2:
    raise ValueError(f"block_tables {block_tables.shape} must be [{q.shape[0]}, pages_per_seq]")
  if positions.shape != q.shape[:1]:
    raise ValueError(f"positions {positions.shape} must be [{q.shape[0]}]")


@functools.partial(
    jax.jit, static_argnames=("rope_theta", "sm_scale", "block_sizes", "interpret", "mask_value"))
def paged_decode_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_tables: jax.Array,
    positions: jax.Array,
    *,
    block_pos: jax.Array | None = None,
    block_len: jax.Array | None = None,
    layer: jax.Array | None = None,
    rope_theta: float,
    sm_scale: float | None = None,
    block_sizes: BlockSizes = BlockSizes(),
    interpret: bool = False,
    mask_value: float = DEFAULT_MASK_VALUE,
) -> jax.Array:
  """Decode attention over paged, un-rotated keys.

  Args:
    q: [batch, n_heads, d] un-rotated query of each sequence's newest token.
    k_pages: [kv_heads, num_pages, page_size, d] keys before RoPE, or
      [layers, kv_heads, num_pages, page_size, d] together with `layer`.
    v_pages: same shape as k_pages.
    block_tables: [batch, pages_per_seq] int32.
    positions: [batch] int32 position of the query (its own K/V already
      written there); the sequence's keys are positions 0..positions[b].
      -1 marks an idle batch slot (output zero).
    block_pos: [rows, pages_per_seq] int32 logical position of slot 0 of each
      block, increasing along a row; default j * page_size.
    block_len: [rows, pages_per_seq] int32 valid slots per block (0 marks an
      unused entry); default page_size.
    layer: int32 scalar, the layer to read when the pools hold every layer.
    rope_theta: RoPE base.
    sm_scale: softmax scale; default 1/sqrt(d).
    block_sizes: tuning (pages per step, warps, stages; block_q unused).
    interpret: run the Pallas kernel in interpret mode (CPU).

  Returns:
    [batch, n_heads, d].
  """
  _check_args(q, k_pages, v_pages, block_tables, positions)
  pool_k, pool_v, layer_idx = _body.layered(k_pages, v_pages, layer)
  layers = pool_k.shape[0]
  batch, n_heads, d = q.shape
  kv_heads = pool_k.shape[1]
  group = n_heads // kv_heads
  rows = max(_MIN_ROWS, _body.next_pow2(group))
  ppb = _body.pages_per_step(block_sizes, k_pages.shape[-2])
  sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale

  q_g = jnp.pad(q.reshape(batch, kv_heads, group, d), ((0, 0), (0, 0), (0, rows - group), (0, 0)))
  pos_rows = jnp.broadcast_to(positions.astype(jnp.int32)[:, None], (batch, rows))
  tables, starts, lens = _body.block_layout(block_tables, block_pos, block_len,
                                            pool_k.shape[3], ppb)

  kernel = functools.partial(_body.attention_kernel, sm_scale=sm_scale, pages_per_block=ppb,
                             mask_value=mask_value)
  out = pl.pallas_call(
      kernel,
      grid=(batch, kv_heads),
      in_specs=[
          pl.BlockSpec((None, None, rows, d), lambda b, h: (b, h, 0, 0)),
          pl.BlockSpec((None, rows), lambda b, h: (b, 0)),
          pl.BlockSpec((1,), lambda b, h: (0,)),
          pl.BlockSpec((layers, None, *pool_k.shape[2:]), lambda b, h: (0, h, 0, 0, 0)),
          pl.BlockSpec((layers, None, *pool_k.shape[2:]), lambda b, h: (0, h, 0, 0, 0)),
          pl.BlockSpec((None, tables.shape[1]), lambda b, h: (b, 0)),
          pl.BlockSpec((None, tables.shape[1]), lambda b, h: (b, 0)),
          pl.BlockSpec((None, tables.shape[1]), lambda b, h: (b, 0)),
          pl.BlockSpec((d,), lambda b, h: (0,)),
          pl.BlockSpec((d, d), lambda b, h: (0, 0)),
      ],
      out_specs=pl.BlockSpec((None, None, rows, d), lambda b, h: (b, h, 0, 0)),
      out_shape=jax.ShapeDtypeStruct((batch, kv_heads, rows, d), q.dtype),
      interpret=interpret,
      compiler_params=_body.compiler_params(block_sizes),
      name="paged_decode_attention",
  )(q_g, pos_rows, layer_idx, pool_k, pool_v, tables, starts, lens,
    jnp.asarray(_inv_freq(d, rope_theta)), jnp.asarray(rotate_half_matrix(d)))
  return out[:, :, :group].reshape(batch, n_heads, d)


@functools.partial(
    jax.jit, static_argnames=("rope_theta", "sm_scale", "block_sizes", "interpret", "mask_value"))
def paged_decode_attention_reference(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_tables: jax.Array,
    positions: jax.Array,
    *,
    block_pos: jax.Array | None = None,
    block_len: jax.Array | None = None,
    layer: jax.Array | None = None,
    rope_theta: float,
    sm_scale: float | None = None,
    block_sizes: BlockSizes = BlockSizes(),
    interpret: bool = False,
    mask_value: float = DEFAULT_MASK_VALUE,
) -> jax.Array:
  """Plain-jnp decode attention, same signature (tuning args ignored)."""
  del block_sizes, interpret
  _check_args(q, k_pages, v_pages, block_tables, positions)
  pool_k, pool_v, layer_idx = _body.layered(k_pages, v_pages, layer)
  k_pages, v_pages = pool_k[layer_idx[0]], pool_v[layer_idx[0]]
  batch, n_heads, d = q.shape
  kv_heads, _, page_size, _ = k_pages.shape
  group = n_heads // kv_heads
  sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
  freqs = jnp.asarray(_inv_freq(d, rope_theta))
  tables, starts, lens = _body.block_layout(block_tables, block_pos, block_len, page_size, 1)
  ctx = tables.shape[1] * page_size

  def one_seq(q_b, table, start, length, pos):
    k_pos, k_ok = _body.key_positions_reference(start, length, page_size)  # [ctx]
    k = k_pages[:, table].reshape(kv_heads, ctx, d)
    v = v_pages[:, table].reshape(kv_heads, ctx, d)
    k = _body.rope_reference(k, k_pos[None, :], freqs)  # [kv_heads, ctx, d]
    qr = _body.rope_reference(q_b, pos, freqs).reshape(kv_heads, group, d)
    mask = jnp.broadcast_to(k_ok & (k_pos <= pos), (group, ctx))
    attend = functools.partial(_body.softmax_attend_reference, mask=mask, sm_scale=sm_scale,
                               mask_value=mask_value)
    return jax.vmap(attend)(qr, k, v).reshape(n_heads, d)

  out = jax.vmap(one_seq)(q, tables, starts, lens, positions.astype(jnp.int32))
  return out.astype(q.dtype)
