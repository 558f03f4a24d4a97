"""Paged decode attention: one new query per sequence, GQA, split-K, keys rotated in-kernel.

Flash-decoding: the grid runs over (sequence, KV head, split). Each program
holds every query head of its KV group (the group padded only to a power of
two, `BlockSizes.min_rows` at least) and walks one split of the sequence's
live steps with an online softmax; a combine step in jnp merges the splits'
(o, max, sum). Split boundaries follow each sequence's own context length
at run time: its live steps are shared out evenly, so a short sequence
leaves its last splits empty (they exit at once) and a long one keeps every
program busy. The number of splits is static (a grid dimension) and comes
from the batch and the block-table width (`split_count`).

Rows of different sequences cannot share a dot: their keys differ. What
fills the hardware at small batch is the split, not packing.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import attention_body as body
from . import tpu_attention
from .attention_body import DEFAULT_MASK_VALUE, BlockSizes
from .lowering import check_compiled_shapes, resolve_lowering
from .rope import inv_freq as _inv_freq


def kv_cache_shape(num_pages: int, page_size: int, kv_heads: int, head_dim: int):
  """The page-pool layout both kernels read: [kv_heads, num_pages, page_size, head_dim]."""
  return (kv_heads, num_pages, page_size, head_dim)


def split_count(block_sizes: BlockSizes, programs: int, steps: int) -> int:
  """Context splits per (sequence, KV head): block_sizes.num_splits, or enough that
  programs * splits reaches split_programs, each split keeping >= min_split_steps steps."""
  if block_sizes.num_splits:
    return min(block_sizes.num_splits, steps)
  wanted = -(-block_sizes.split_programs // programs)
  return max(1, min(wanted, steps // block_sizes.min_split_steps))


def _decode_kernel(
    q_ref,  # [r, d] rotated, scaled queries of one KV head's group (one sequence)
    q_pos_ref,  # [r] int32, the sequence's position on every row (-1: idle slot)
    layer_ref,  # [1] int32 layer to read
    k_pages_ref,  # [layers, num_pages, page_size, d] this KV head, every layer
    v_pages_ref,  # [layers, num_pages, page_size, d]
    block_table_ref,  # [pages_per_seq]
    block_pos_ref,  # [pages_per_seq]
    block_len_ref,  # [pages_per_seq]
    cos_ref,  # [positions, d/2]
    sin_ref,  # [positions, d/2]
    o_ref,  # [r, d] float32 un-normalized output of this split
    m_ref,  # [r] float32 running max
    l_ref,  # [r] float32 running sum
    *,
    num_splits: int,
    pages_per_block: int,
    mask_value: float,
):
  o, m, total = body.attend_split(
      q_ref, q_pos_ref, layer_ref, k_pages_ref, v_pages_ref, block_table_ref, block_pos_ref,
      block_len_ref, cos_ref, sin_ref, pl.program_id(2), num_splits=num_splits,
      pages_per_block=pages_per_block, mask_value=mask_value)
  o_ref[...] = o
  m_ref[...] = m
  l_ref[...] = total


def combine_splits(o, m, total):
  """Merge per-split partials: o [..., splits, r, d], m / total [..., splits, r] -> [..., r, d].

  Each split's (o, m, l) is an online-softmax state over its own keys; a
  split that saw no key has m = mask_value and l = o = 0 and gets weight 0
  (or, when every split is empty, the row comes out 0).
  """
  m_all = m.max(axis=-2, keepdims=True)  # [..., 1, r]
  w = jnp.exp(m - m_all)  # [..., splits, r]
  l_all = (w * total).sum(axis=-2)  # [..., r]
  o_all = (w[..., None] * o).sum(axis=-3)  # [..., r, d]
  return o_all / jnp.where(l_all == 0.0, 1.0, l_all)[..., None]


def _check_args(q, k_pages, v_pages, block_tables, positions):
  body.check_query(q, k_pages, v_pages, "batch")
  if block_tables.shape[:1] != q.shape[:1] or block_tables.ndim != 2:
    raise ValueError(f"block_tables {block_tables.shape} must be [{q.shape[0]}, pages_per_seq]")
  if positions.shape != q.shape[:1]:
    raise ValueError(f"positions {positions.shape} must be [{q.shape[0]}]")


_STATIC = ("rope_theta", "sm_scale", "block_sizes", "interpret", "mask_value", "max_position",
           "lowering")


@functools.partial(jax.jit, static_argnames=_STATIC)
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
    max_position: int | None = None,
    lowering: str | None = None,
) -> jax.Array:
  """Decode attention over paged, un-rotated keys, split over the context.

  Args:
    q: [batch, n_heads, d] un-rotated query of each sequence's newest token.
    k_pages: [kv_heads, num_pages, page_size, d] keys before RoPE, or
      [layers, kv_heads, num_pages, page_size, d] together with `layer`.
    v_pages: same shape as k_pages.
    block_tables: [batch, pages_per_seq] int32.
    positions: [batch] int32 position of the query (its own K/V already
      written there); the sequence's keys are positions 0..positions[b].
      -1 marks an idle batch slot (output zero).
    block_pos: [batch, pages_per_seq] int32 logical position of slot 0 of
      each block, increasing along a row; default j * page_size.
    block_len: [batch, pages_per_seq] int32 valid slots per block (0 marks
      an unused entry, after the used ones); default page_size.
    layer: int32 scalar, the layer to read when the pools hold every layer.
    rope_theta: RoPE base.
    sm_scale: softmax scale; default 1/sqrt(d).
    block_sizes: tuning (pages per step, splits, rows, warps, stages; block_q unused).
    interpret: run the Pallas kernel in interpret mode (CPU); for the TPU
      lowering also a `pltpu.InterpretParams`.
    max_position: every key position is below it (sizes the cos/sin table of
      the Triton kernel); default pages_per_seq * page_size.
    lowering: "triton" or "mosaic_tpu" (`tpu_attention`); None picks by the
      default backend (`lowering.resolve_lowering`).

  Returns:
    [batch, n_heads, d].
  """
  _check_args(q, k_pages, v_pages, block_tables, positions)
  if resolve_lowering(lowering) == "mosaic_tpu":
    return tpu_attention.paged_decode_attention(
        q, k_pages, v_pages, block_tables, positions, block_pos=block_pos, block_len=block_len,
        layer=layer, rope_theta=rope_theta, sm_scale=sm_scale, block_sizes=block_sizes,
        interpret=interpret, mask_value=mask_value)
  pool_k, pool_v, layer_idx = body.layered(k_pages, v_pages, layer)
  layers, kv_heads, _, page_size, d = pool_k.shape
  batch, n_heads, _ = q.shape
  group = n_heads // kv_heads
  rows = max(block_sizes.min_rows, body.next_pow2(group))
  ppb = body.pages_per_step(block_sizes, page_size)
  check_compiled_shapes(head_dim=d, block_k=ppb * page_size, dtype=pool_k.dtype,
                        interpret=interpret)
  sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale

  pos = positions.astype(jnp.int32)
  q_rot = body.rotate_queries(q, pos[:, None], rope_theta, sm_scale, pool_k.dtype)
  q_g = jnp.pad(q_rot.reshape(batch, kv_heads, group, d),
                ((0, 0), (0, 0), (0, rows - group), (0, 0)))  # [batch, kv_heads, rows, d]
  pos_rows = jnp.broadcast_to(pos[:, None], (batch, rows))
  tables, starts, lens = body.block_layout(block_tables, block_pos, block_len, page_size, ppb)
  width = tables.shape[1]
  splits = split_count(block_sizes, batch * kv_heads, width // ppb)
  cos, sin = body.rope_tables(d, rope_theta, max_position, block_tables.shape[1], page_size)

  kernel = functools.partial(_decode_kernel, num_splits=splits, pages_per_block=ppb,
                             mask_value=mask_value)
  pool_spec = pl.BlockSpec((layers, None, *pool_k.shape[2:]), lambda b, h, s: (0, h, 0, 0, 0))
  row_spec = pl.BlockSpec((None, width), lambda b, h, s: (b, 0))
  table_spec = pl.BlockSpec(cos.shape, lambda b, h, s: (0, 0))
  o, m, total = pl.pallas_call(
      kernel,
      grid=(batch, kv_heads, splits),
      in_specs=[
          pl.BlockSpec((None, None, rows, d), lambda b, h, s: (b, h, 0, 0)),
          pl.BlockSpec((None, rows), lambda b, h, s: (b, 0)),
          pl.BlockSpec((1,), lambda b, h, s: (0,)),
          pool_spec, pool_spec, row_spec, row_spec, row_spec, table_spec, table_spec,
      ],
      out_specs=[
          pl.BlockSpec((None, None, None, rows, d), lambda b, h, s: (b, h, s, 0, 0)),
          pl.BlockSpec((None, None, None, rows), lambda b, h, s: (b, h, s, 0)),
          pl.BlockSpec((None, None, None, rows), lambda b, h, s: (b, h, s, 0)),
      ],
      out_shape=[
          jax.ShapeDtypeStruct((batch, kv_heads, splits, rows, d), jnp.float32),
          jax.ShapeDtypeStruct((batch, kv_heads, splits, rows), jnp.float32),
          jax.ShapeDtypeStruct((batch, kv_heads, splits, rows), jnp.float32),
      ],
      interpret=interpret,
      compiler_params=block_sizes.compiler_params(),
      name="paged_decode_attention",
  )(q_g, pos_rows, layer_idx, pool_k, pool_v, tables, starts, lens, cos, sin)
  out = combine_splits(o, m, total)  # [batch, kv_heads, rows, d]
  return out[:, :, :group].reshape(batch, n_heads, d).astype(q.dtype)


@functools.partial(jax.jit, static_argnames=_STATIC)
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
    max_position: int | None = None,
    lowering: str | None = None,
) -> jax.Array:
  """Plain-jnp decode attention, same signature (tuning args ignored)."""
  del block_sizes, interpret, max_position, lowering
  _check_args(q, k_pages, v_pages, block_tables, positions)
  pool_k, pool_v, layer_idx = body.layered(k_pages, v_pages, layer)
  k_pages, v_pages = pool_k[layer_idx[0]], pool_v[layer_idx[0]]
  batch, n_heads, d = q.shape
  kv_heads, _, page_size, _ = k_pages.shape
  group = n_heads // kv_heads
  sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
  freqs = jnp.asarray(_inv_freq(d, rope_theta))
  tables, starts, lens = body.block_layout(block_tables, block_pos, block_len, page_size, 1)
  ctx = tables.shape[1] * page_size

  def one_seq(q_b, table, start, length, pos):
    k_pos, k_ok = body.key_positions_reference(start, length, page_size)  # [ctx]
    k = k_pages[:, table].reshape(kv_heads, ctx, d)
    v = v_pages[:, table].reshape(kv_heads, ctx, d)
    k = body.rope_reference(k, k_pos[None, :], freqs)  # [kv_heads, ctx, d]
    qr = body.rope_reference(q_b, pos, freqs).reshape(kv_heads, group, d)
    mask = jnp.broadcast_to(k_ok & (k_pos <= pos), (group, ctx))
    attend = functools.partial(body.softmax_attend_reference, mask=mask, sm_scale=sm_scale,
                               mask_value=mask_value)
    return jax.vmap(attend)(qr, k, v).reshape(n_heads, d)

  out = jax.vmap(one_seq)(q, tables, starts, lens, positions.astype(jnp.int32))
  return out.astype(q.dtype)
