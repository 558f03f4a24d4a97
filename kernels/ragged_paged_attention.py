"""Ragged paged prefill attention: a flat list of query tokens from many sequences.

Each query token carries its sequence id and logical position and attends,
causally by position, to its sequence's pages. One kernel serves plain
prefill, chunked prefill and selective recompute of scattered tokens (the
queries are then just the recomputed tokens). Keys are stored before RoPE and
rotated in-kernel.

Queries are regrouped into tiles of `block_q` tokens of one sequence (the
tile plan, computed in jnp inside jit), so each program reads a single
block-table row.
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


def tile_plan(q_seq_ids, q_positions, num_seqs: int, block_q: int):
  """Group flat query tokens into tiles of one sequence each.

  Args:
    q_seq_ids: [t] int32 sequence of each token.
    q_positions: [t] int32 logical position; -1 marks padding.
    num_seqs: number of block-table rows.
    block_q: tokens per tile.

  Returns:
    token_index: [n_tiles, block_q] int32 flat token per tile row; t = padding.
    tile_seq: [n_tiles] int32 sequence of each tile (0 for empty tiles).
  """
  t = q_seq_ids.shape[0]
  n_tiles = -(-t // block_q) + min(num_seqs, t)
  valid = q_positions >= 0
  key = jnp.where(valid, q_seq_ids, num_seqs)
  order = jnp.argsort(key, stable=True)  # [t] tokens grouped by sequence, padding last
  seq_sorted = key[order]
  counts = jnp.zeros(num_seqs + 1, jnp.int32).at[key].add(1)[:num_seqs]
  tiles_per_seq = -(-counts // block_q)
  first_tile = jnp.cumsum(tiles_per_seq) - tiles_per_seq
  first_token = jnp.cumsum(counts) - counts
  seq_c = jnp.minimum(seq_sorted, num_seqs - 1)
  rank = jnp.arange(t, dtype=jnp.int32) - first_token[seq_c]
  tile = jnp.where(seq_sorted < num_seqs, first_tile[seq_c] + rank // block_q, n_tiles)
  row = rank % block_q
  token_index = jnp.full((n_tiles, block_q), t, jnp.int32).at[tile, row].set(
      order.astype(jnp.int32), mode="drop")
  tile_seq = jnp.zeros((n_tiles,), jnp.int32).at[tile].set(seq_c, mode="drop")
  return token_index, tile_seq


def _check_args(q, k_pages, v_pages, block_tables, q_positions, q_seq_ids):
  _body.check_query(q, k_pages, v_pages, "tokens")
  if q_positions.shape != q.shape[:1] or q_seq_ids.shape != q.shape[:1]:
    raise ValueError(f"q_positions {q_positions.shape} and q_seq_ids {q_seq_ids.shape} must be "
                     f"[{q.shape[0]}]")
  if block_tables.ndim != 2:
    raise ValueError(f"block_tables must be [num_seqs, pages_per_seq], got {block_tables.shape}")


@functools.partial(
    jax.jit, static_argnames=("rope_theta", "sm_scale", "block_sizes", "interpret", "mask_value"))
def ragged_paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_tables: jax.Array,
    q_positions: jax.Array,
    q_seq_ids: jax.Array,
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
  """Ragged paged attention with in-kernel RoPE.

  Args:
    q: [t, n_heads, d] un-rotated queries, flat over all sequences.
    k_pages: [kv_heads, num_pages, page_size, d] keys before RoPE, or
      [layers, kv_heads, num_pages, page_size, d] together with `layer`.
    v_pages: same shape as k_pages.
    block_tables: [num_seqs, pages_per_seq] int32 physical page per logical block.
    q_positions: [t] int32 logical position of each query; -1 marks padding.
    q_seq_ids: [t] int32 block-table row of each query.
    block_pos: [rows, pages_per_seq] int32 logical position of slot 0 of each
      block, increasing along a row; default j * page_size.
    block_len: [rows, pages_per_seq] int32 valid slots per block (0 marks an
      unused entry); default page_size.
    layer: int32 scalar, the layer to read when the pools hold every layer.
    rope_theta: RoPE base.
    sm_scale: softmax scale; default 1/sqrt(d).
    block_sizes: tuning (tokens per tile, pages per step, warps, stages).
    interpret: run the Pallas kernel in interpret mode (CPU).

  Returns:
    [t, n_heads, d] attention output; padding rows are zero. Each query sees
    keys at positions <= its own, which must already be written.
  """
  _check_args(q, k_pages, v_pages, block_tables, q_positions, q_seq_ids)
  pool_k, pool_v, layer_idx = _body.layered(k_pages, v_pages, layer)
  layers = pool_k.shape[0]
  t, n_heads, d = q.shape
  kv_heads = pool_k.shape[1]
  group = n_heads // kv_heads
  group_pad = _body.next_pow2(group)
  block_q = block_sizes.block_q
  ppb = _body.pages_per_step(block_sizes, k_pages.shape[-2])
  sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
  num_seqs, pages_per_seq = block_tables.shape

  token_index, tile_seq = tile_plan(q_seq_ids, q_positions, num_seqs, block_q)
  n_tiles = token_index.shape[0]
  rows = block_q * group_pad
  # [t + 1, kv_heads, group_pad, d] with a zero padding token at index t.
  q_g = jnp.pad(q.reshape(t, kv_heads, group, d), ((0, 1), (0, 0), (0, group_pad - group), (0, 0)))
  q_tiles = q_g[token_index].transpose(0, 2, 1, 3, 4).reshape(n_tiles, kv_heads, rows, d)
  pos_pad = jnp.concatenate([q_positions.astype(jnp.int32), jnp.full((1,), -1, jnp.int32)])
  pos_tiles = jnp.repeat(pos_pad[token_index], group_pad, axis=1)  # [n_tiles, rows]
  tables, starts, lens = _body.block_layout(block_tables, block_pos, block_len,
                                            pool_k.shape[3], ppb)
  tables, starts, lens = tables[tile_seq], starts[tile_seq], lens[tile_seq]

  kernel = functools.partial(_body.attention_kernel, sm_scale=sm_scale, pages_per_block=ppb,
                             mask_value=mask_value)
  out = pl.pallas_call(
      kernel,
      grid=(n_tiles, kv_heads),
      in_specs=[
          pl.BlockSpec((None, None, rows, d), lambda i, h: (i, h, 0, 0)),
          pl.BlockSpec((None, rows), lambda i, h: (i, 0)),
          pl.BlockSpec((1,), lambda i, h: (0,)),
          pl.BlockSpec((layers, None, *pool_k.shape[2:]), lambda i, h: (0, h, 0, 0, 0)),
          pl.BlockSpec((layers, None, *pool_k.shape[2:]), lambda i, h: (0, h, 0, 0, 0)),
          pl.BlockSpec((None, tables.shape[1]), lambda i, h: (i, 0)),
          pl.BlockSpec((None, tables.shape[1]), lambda i, h: (i, 0)),
          pl.BlockSpec((None, tables.shape[1]), lambda i, h: (i, 0)),
          pl.BlockSpec((d,), lambda i, h: (0,)),
          pl.BlockSpec((d, d), lambda i, h: (0, 0)),
      ],
      out_specs=pl.BlockSpec((None, None, rows, d), lambda i, h: (i, h, 0, 0)),
      out_shape=jax.ShapeDtypeStruct((n_tiles, kv_heads, rows, d), q.dtype),
      interpret=interpret,
      compiler_params=_body.compiler_params(block_sizes),
      name="ragged_paged_attention",
  )(q_tiles, pos_tiles, layer_idx, pool_k, pool_v, tables, starts, lens,
    jnp.asarray(_inv_freq(d, rope_theta)), jnp.asarray(rotate_half_matrix(d)))

  # [n_tiles, block_q, kv_heads, group, d] -> scatter rows back to flat tokens.
  out = out.reshape(n_tiles, kv_heads, block_q, group_pad, d)[:, :, :, :group]
  out = out.transpose(0, 2, 1, 3, 4).reshape(n_tiles * block_q, n_heads, d)
  flat = jnp.zeros((t + 1, n_heads, d), q.dtype).at[token_index.reshape(-1)].set(out, mode="drop")
  return flat[:t]


@functools.partial(jax.jit, static_argnames=("rope_theta", "sm_scale", "block_sizes", "interpret",
                                             "mask_value"))
def ragged_paged_attention_reference(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_tables: jax.Array,
    q_positions: jax.Array,
    q_seq_ids: jax.Array,
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
  """Plain-jnp ragged paged attention, same signature (tuning args ignored).

  Works sequence-chunk by chunk with `lax.map` so memory stays bounded: each
  step gathers one tile's sequence pages densely and attends.
  """
  del interpret
  g = _gather_sequences(q, k_pages, v_pages, block_tables, q_positions, q_seq_ids, block_pos,
                        block_len, layer, rope_theta, sm_scale, max(block_sizes.block_q, 64))

  def one_tile(args):
    idx, seq = args  # [block_q], []
    pos, qg = g.tile_queries(idx)
    k, v = g.k_seq[:, seq], g.v_seq[:, seq]  # [kv_heads, ctx, d]
    mask = g.k_ok[seq][None, :] & (g.k_pos[seq][None, :] <= pos[:, None])  # [block_q, ctx]
    attend = functools.partial(_body.softmax_attend_reference, mask=mask, sm_scale=g.sm_scale,
                               mask_value=mask_value)
    return jax.vmap(jax.vmap(attend, (0, None, None)))(qg, k, v)  # [kv_heads, group, block_q, d]

  return g.scatter(jax.lax.map(one_tile, (g.token_index, g.tile_seq)), q.dtype)


def ragged_paged_attention_chunked(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_tables: jax.Array,
    q_positions: jax.Array,
    q_seq_ids: jax.Array,
    *,
    block_pos: jax.Array | None = None,
    block_len: jax.Array | None = None,
    layer: jax.Array | None = None,
    rope_theta: float,
    sm_scale: float | None = None,
    block_sizes: BlockSizes = BlockSizes(),
    interpret: bool = False,
    mask_value: float = DEFAULT_MASK_VALUE,
    block_k: int = 256,
) -> jax.Array:
  """Ragged paged attention in plain jnp that skips the keys no query of a tile can see.

  The CPU fast path, same signature as the reference. Like the kernel, each
  tile of `block_q` queries walks its sequence's keys `block_k` at a time
  with an online softmax, and stops after the last key block holding a
  position <= the tile's largest query position (a `fori_loop` with a
  data-dependent trip count). The reference instead scores every tile against
  the whole padded context: on a scattered recompute that is ~2x the causal
  work plus the padding to the widest sequence.
  """
  del interpret
  g = _gather_sequences(q, k_pages, v_pages, block_tables, q_positions, q_seq_ids, block_pos,
                        block_len, layer, rope_theta, sm_scale, max(block_sizes.block_q, 64))
  ctx = g.k_seq.shape[2]
  block_k = min(block_k, ctx)
  pad = -ctx % block_k
  k_seq = jnp.pad(g.k_seq, ((0, 0), (0, 0), (0, pad), (0, 0)))
  v_seq = jnp.pad(g.v_seq, ((0, 0), (0, 0), (0, pad), (0, 0)))
  k_pos = jnp.pad(g.k_pos, ((0, 0), (0, pad)), constant_values=-1)
  k_ok = jnp.pad(g.k_ok, ((0, 0), (0, pad)))
  kv_heads, group, d = k_seq.shape[0], q.shape[1] // k_seq.shape[0], q.shape[2]
  key_index = jnp.arange(ctx + pad, dtype=jnp.int32)

  def one_tile(args):
    idx, seq = args
    pos, qg = g.tile_queries(idx)  # [block_q], [kv_heads, group, block_q, d] float32
    bq = pos.shape[0]
    qg = qg.reshape(kv_heads, group * bq, d) * g.sm_scale  # the group's rows share keys
    visible = k_ok[seq] & (k_pos[seq] <= pos.max())  # keys are in position order
    n_blocks = (jnp.max(jnp.where(visible, key_index, -1)) + block_k) // block_k
    ks, vs, kps, oks = k_seq[:, seq], v_seq[:, seq], k_pos[seq], k_ok[seq]

    def body(j, carry):
      m, l, acc = carry
      kb = jax.lax.dynamic_slice_in_dim(ks, j * block_k, block_k, axis=1)
      vb = jax.lax.dynamic_slice_in_dim(vs, j * block_k, block_k, axis=1)
      kp = jax.lax.dynamic_slice_in_dim(kps, j * block_k, block_k)
      ok = jax.lax.dynamic_slice_in_dim(oks, j * block_k, block_k)
      mask = ok[None, :] & (kp[None, :] <= pos[:, None])  # [block_q, block_k]
      rows = jnp.tile(mask, (group, 1))  # [group * block_q, block_k]
      s = jnp.einsum("hrd,hkd->hrk", qg, kb.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
      s = jnp.where(rows, s, mask_value)
      m_new = jnp.maximum(m, s.max(axis=-1))
      p = jnp.where(rows, jnp.exp(s - m_new[..., None]), 0.0)
      scale = jnp.exp(m - m_new)
      vb = jnp.where(mask.any(axis=0)[:, None], vb.astype(jnp.float32), 0.0)  # padding may be NaN
      acc = acc * scale[..., None] + jnp.einsum("hrk,hkd->hrd", p, vb,
                                                precision=jax.lax.Precision.HIGHEST)
      return m_new, l * scale + p.sum(axis=-1), acc

    shape = (kv_heads, group * bq)
    init = (jnp.full(shape, mask_value, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros((*shape, d), jnp.float32))
    _, l, acc = jax.lax.fori_loop(0, n_blocks, body, init)
    out = acc / jnp.where(l == 0.0, 1.0, l)[..., None]
    return out.reshape(kv_heads, group, bq, d)

  return g.scatter(jax.lax.map(one_tile, (g.token_index, g.tile_seq)), q.dtype)


class _Gathered:
  """Per-sequence keys (gathered, rotated once), the tile plan, and the output scatter."""

  def __init__(self, **kw):
    self.__dict__.update(kw)

  def tile_queries(self, idx):
    """Tile rows -> (positions [block_q], rotated queries [kv_heads, group, block_q, d])."""
    pos = self.pos_pad[idx]
    qr = _body.rope_reference(self.q_pad[idx], pos[:, None], self.freqs)  # [block_q, h, d]
    d = qr.shape[-1]
    return pos, qr.reshape(-1, self.kv_heads, self.group, d).transpose(1, 2, 0, 3)

  def scatter(self, out, dtype):
    """[n_tiles, kv_heads, group, block_q, d] per tile -> [t, n_heads, d] in token order."""
    n_tiles, _, _, bq, d = out.shape
    out = out.transpose(0, 3, 1, 2, 4).reshape(n_tiles * bq, -1, d)
    flat = jnp.zeros((self.t + 1, out.shape[1], d), jnp.float32).at[
        self.token_index.reshape(-1)].set(out, mode="drop")
    return flat[:self.t].astype(dtype)


def _gather_sequences(q, k_pages, v_pages, block_tables, q_positions, q_seq_ids, block_pos,
                      block_len, layer, rope_theta, sm_scale, block_q):
  _check_args(q, k_pages, v_pages, block_tables, q_positions, q_seq_ids)
  pool_k, pool_v, layer_idx = _body.layered(k_pages, v_pages, layer)
  k_pages, v_pages = pool_k[layer_idx[0]], pool_v[layer_idx[0]]
  t, n_heads, d = q.shape
  kv_heads, _, page_size, _ = k_pages.shape
  freqs = jnp.asarray(_inv_freq(d, rope_theta))
  token_index, tile_seq = tile_plan(q_seq_ids, q_positions, block_tables.shape[0], block_q)
  tables, starts, lens = _body.block_layout(block_tables, block_pos, block_len, page_size, 1)
  ctx = tables.shape[1] * page_size
  num_seqs = tables.shape[0]
  # Every sequence's keys gathered and rotated once, then shared by its tiles.
  k_pos, k_ok = jax.vmap(_body.key_positions_reference, (0, 0, None))(starts, lens, page_size)
  k_seq = k_pages[:, tables].reshape(kv_heads, num_seqs, ctx, d)
  k_seq = _body.rope_reference(k_seq, k_pos[None], freqs).astype(k_pages.dtype)
  v_seq = v_pages[:, tables].reshape(kv_heads, num_seqs, ctx, d)
  return _Gathered(
      t=t, kv_heads=kv_heads, group=n_heads // kv_heads, freqs=freqs,
      sm_scale=1.0 / math.sqrt(d) if sm_scale is None else sm_scale,
      q_pad=jnp.pad(q, ((0, 1), (0, 0), (0, 0))),
      pos_pad=jnp.concatenate([q_positions.astype(jnp.int32), jnp.full((1,), -1, jnp.int32)]),
      token_index=token_index, tile_seq=tile_seq, k_seq=k_seq, v_seq=v_seq, k_pos=k_pos,
      k_ok=k_ok)



