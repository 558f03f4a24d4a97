"""Ragged paged prefill attention: a flat list of query tokens from many sequences.

Each query token carries its sequence id and logical position and attends,
causally by position, to its sequence's pages. One kernel serves plain
prefill, chunked prefill and selective recompute of scattered tokens (the
queries are then just the recomputed tokens). Keys are stored before RoPE and
rotated in-kernel, once per step, from a cos/sin table by position.

Queries are regrouped into tiles of tokens of one sequence (the tile plan,
computed in jnp inside jit), so each program reads a single block-table row.
A program's rows are its tokens times the query heads of one KV group,
packed (row = token * group + head) and padded once to a power of two, so a
3-head group costs no per-token padding. Tiles are sized to the work: at
most block_q tokens, fewer when the batch holds few tokens per sequence.
The grid is the static bound on the tile count; the tiles past the real
count hold only padding rows and exit before their first page load.
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
from .lowering import check_compiled_shapes, check_tpu_shapes, resolve_lowering
from .rope import inv_freq as _inv_freq


def tile_tokens(block_q: int, t: int, num_seqs: int) -> int:
  """Tokens per tile: block_q, or the mean tokens per sequence when that is smaller."""
  return max(1, min(block_q, -(-t // max(1, min(num_seqs, t)))))


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
    n_tiles bounds the real count: sequence s with c_s tokens takes
    ceil(c_s / block_q) tiles, at most (t + min(num_seqs, t) * (block_q - 1)) // block_q
    in all; real tiles come first.
  """
  t = q_seq_ids.shape[0]
  n_tiles = max(1, (t + min(num_seqs, t) * (block_q - 1)) // block_q)
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


def _ragged_kernel(
    q_ref,  # [r, d] rotated, scaled queries: tokens x query heads of one KV group, packed
    q_pos_ref,  # [r] int32 position per row; -1 marks a padding row
    layer_ref,  # [1] int32 layer to read
    k_pages_ref,  # [layers, num_pages, page_size, d] this KV head, every layer
    v_pages_ref,  # [layers, num_pages, page_size, d]
    block_table_ref,  # [pages_per_seq] the tile's sequence
    block_pos_ref,  # [pages_per_seq]
    block_len_ref,  # [pages_per_seq]
    cos_ref,  # [positions, d/2]
    sin_ref,  # [positions, d/2]
    o_ref,  # [r, d]
    *,
    pages_per_block: int,
    mask_value: float,
):
  # One share of the steps up to the tile's last query (causal); an empty tile visits none.
  o, _, total = body.attend_split(
      q_ref, q_pos_ref, layer_ref, k_pages_ref, v_pages_ref, block_table_ref, block_pos_ref,
      block_len_ref, cos_ref, sin_ref, 0, num_splits=1, pages_per_block=pages_per_block,
      mask_value=mask_value)
  o_ref[...] = (o / jnp.where(total == 0.0, 1.0, total)[:, None]).astype(o_ref.dtype)


def _check_args(q, k_pages, v_pages, block_tables, q_positions, q_seq_ids):
  body.check_query(q, k_pages, v_pages, "tokens")
  if q_positions.shape != q.shape[:1] or q_seq_ids.shape != q.shape[:1]:
    raise ValueError(f"q_positions {q_positions.shape} and q_seq_ids {q_seq_ids.shape} must be "
                     f"[{q.shape[0]}]")
  if block_tables.ndim != 2:
    raise ValueError(f"block_tables must be [num_seqs, pages_per_seq], got {block_tables.shape}")


_STATIC = ("rope_theta", "sm_scale", "block_sizes", "interpret", "mask_value", "max_position",
           "lowering")


def _pack_tiles(q, q_positions, q_seq_ids, num_seqs, block_q, rows, kv_heads, rope_theta,
                sm_scale, dtype):
  """Flat queries -> tiles of one sequence: (q_tiles [n_tiles, kv_heads, rows, d] rotated and
  scaled, pos_tiles [n_tiles, rows] (-1 on padding rows), token_index, tile_seq).

  Row = token * group + head; rows past block_q * group are padding.
  """
  t, n_heads, d = q.shape
  group = n_heads // kv_heads
  used = block_q * group
  token_index, tile_seq = tile_plan(q_seq_ids, q_positions, num_seqs, block_q)
  n_tiles = token_index.shape[0]
  pos = jnp.concatenate([q_positions.astype(jnp.int32), jnp.full((1,), -1, jnp.int32)])
  q_rot = body.rotate_queries(q, q_positions[:, None], rope_theta, sm_scale, dtype)
  q_rot = jnp.pad(q_rot, ((0, 1), (0, 0), (0, 0)))  # token t: the padding query
  # [n_tiles, block_q, n_heads, d] -> [n_tiles, kv_heads, rows, d], row = token * group + head
  q_tiles = q_rot[token_index].reshape(n_tiles, block_q, kv_heads, group, d)
  q_tiles = q_tiles.transpose(0, 2, 1, 3, 4).reshape(n_tiles, kv_heads, used, d)
  q_tiles = jnp.pad(q_tiles, ((0, 0), (0, 0), (0, rows - used), (0, 0)))
  pos_tiles = jnp.pad(jnp.repeat(pos[token_index], group, axis=1), ((0, 0), (0, rows - used)),
                      constant_values=-1)  # [n_tiles, rows]
  return q_tiles, pos_tiles, token_index, tile_seq


def _unpack_tiles(out, token_index, t, group, dtype):
  """[n_tiles, kv_heads, rows, d] tile outputs -> [t, n_heads, d] in token order."""
  n_tiles, kv_heads, _, d = out.shape
  block_q = token_index.shape[1]
  out = out[:, :, :block_q * group].reshape(n_tiles, kv_heads, block_q, group, d)
  out = out.transpose(0, 2, 1, 3, 4).reshape(n_tiles * block_q, kv_heads * group, d)
  flat = jnp.zeros((t + 1, kv_heads * group, d), dtype).at[token_index.reshape(-1)].set(
      out, mode="drop")
  return flat[:t]


@functools.partial(jax.jit, static_argnames=_STATIC)
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
    max_position: int | None = None,
    lowering: str | None = None,
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
    block_pos: [num_seqs, pages_per_seq] int32 logical position of slot 0 of
      each block, increasing along a row; default j * page_size.
    block_len: [num_seqs, pages_per_seq] int32 valid slots per block (0 marks
      an unused entry, after the used ones); default page_size.
    layer: int32 scalar, the layer to read when the pools hold every layer.
    rope_theta: RoPE base.
    sm_scale: softmax scale; default 1/sqrt(d).
    block_sizes: tuning (most tokens per tile, pages per step, rows, warps, stages).
    interpret: run the Pallas kernel in interpret mode (CPU); for the TPU
      lowering also a `pltpu.InterpretParams`.
    max_position: every key position is below it (sizes the cos/sin table of
      the Triton kernel); default pages_per_seq * page_size.
    lowering: "triton" or "mosaic_tpu" (`tpu_attention`); None picks by the
      default backend (`lowering.resolve_lowering`).

  Returns:
    [t, n_heads, d] attention output; padding rows are zero. Each query sees
    keys at positions <= its own, which must already be written.
  """
  _check_args(q, k_pages, v_pages, block_tables, q_positions, q_seq_ids)
  pool_k, pool_v, layer_idx = body.layered(k_pages, v_pages, layer)
  layers, kv_heads, _, page_size, d = pool_k.shape
  t, n_heads, _ = q.shape
  group = n_heads // kv_heads
  num_seqs = block_tables.shape[0]
  block_q = tile_tokens(block_sizes.block_q, t, num_seqs)
  sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
  tpu = resolve_lowering(lowering) == "mosaic_tpu"
  if tpu:  # rows in whole sublane tiles
    check_tpu_shapes(head_dim=d, page_size=page_size, dtype=pool_k.dtype)
    rows = tpu_attention.round_rows(block_q * group, pool_k.dtype, block_sizes.min_rows)
  else:  # Triton: a power of two
    rows = max(block_sizes.min_rows, body.next_pow2(block_q * group))
  q_tiles, pos_tiles, token_index, tile_seq = _pack_tiles(
      q, q_positions, q_seq_ids, num_seqs, block_q, rows, kv_heads, rope_theta, sm_scale,
      pool_k.dtype)
  if tpu:
    out = tpu_attention.ragged_paged_attention(
        q_tiles, pos_tiles, tile_seq, pool_k, pool_v, layer_idx, block_tables, block_pos,
        block_len, rope_theta=rope_theta, block_sizes=block_sizes, interpret=interpret,
        mask_value=mask_value)
    return _unpack_tiles(out, token_index, t, group, q.dtype)

  ppb = body.pages_per_step(block_sizes, page_size)
  check_compiled_shapes(head_dim=d, block_k=ppb * page_size, dtype=pool_k.dtype,
                        interpret=interpret)
  n_tiles = token_index.shape[0]
  tables, starts, lens = body.block_layout(block_tables, block_pos, block_len, page_size, ppb)
  tables, starts, lens = tables[tile_seq], starts[tile_seq], lens[tile_seq]
  width = tables.shape[1]
  cos, sin = body.rope_tables(d, rope_theta, max_position, block_tables.shape[1], page_size)

  kernel = functools.partial(_ragged_kernel, pages_per_block=ppb, mask_value=mask_value)
  pool_spec = pl.BlockSpec((layers, None, *pool_k.shape[2:]), lambda i, h: (0, h, 0, 0, 0))
  row_spec = pl.BlockSpec((None, width), lambda i, h: (i, 0))
  table_spec = pl.BlockSpec(cos.shape, lambda i, h: (0, 0))
  out = pl.pallas_call(
      kernel,
      grid=(n_tiles, kv_heads),
      in_specs=[
          pl.BlockSpec((None, None, rows, d), lambda i, h: (i, h, 0, 0)),
          pl.BlockSpec((None, rows), lambda i, h: (i, 0)),
          pl.BlockSpec((1,), lambda i, h: (0,)),
          pool_spec, pool_spec, row_spec, row_spec, row_spec, table_spec, table_spec,
      ],
      out_specs=pl.BlockSpec((None, None, rows, d), lambda i, h: (i, h, 0, 0)),
      out_shape=jax.ShapeDtypeStruct((n_tiles, kv_heads, rows, d), q.dtype),
      interpret=interpret,
      compiler_params=block_sizes.compiler_params(),
      name="ragged_paged_attention",
  )(q_tiles, pos_tiles, layer_idx, pool_k, pool_v, tables, starts, lens, cos, sin)
  return _unpack_tiles(out, token_index, t, group, q.dtype)


@functools.partial(jax.jit, static_argnames=_STATIC)
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
    max_position: int | None = None,
    lowering: str | None = None,
) -> jax.Array:
  """Plain-jnp ragged paged attention, same signature (tuning args ignored).

  Works sequence-chunk by chunk with `lax.map` so memory stays bounded: each
  step gathers one tile's sequence pages densely and attends.
  """
  del interpret, max_position, lowering
  g = _gather_sequences(q, k_pages, v_pages, block_tables, q_positions, q_seq_ids, block_pos,
                        block_len, layer, rope_theta, sm_scale, max(block_sizes.block_q, 64))

  def one_tile(args):
    idx, seq = args  # [block_q], []
    pos, qg = g.tile_queries(idx)
    k, v = g.k_seq[:, seq], g.v_seq[:, seq]  # [kv_heads, ctx, d]
    mask = g.k_ok[seq][None, :] & (g.k_pos[seq][None, :] <= pos[:, None])  # [block_q, ctx]
    attend = functools.partial(body.softmax_attend_reference, mask=mask, sm_scale=g.sm_scale,
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
    max_position: int | None = None,
    lowering: str | None = None,
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
  del interpret, max_position, lowering
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

    def step(j, carry):
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
    _, l, acc = jax.lax.fori_loop(0, n_blocks, step, init)
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
    qr = body.rope_reference(self.q_pad[idx], pos[:, None], self.freqs)  # [block_q, h, d]
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
  pool_k, pool_v, layer_idx = body.layered(k_pages, v_pages, layer)
  k_pages, v_pages = pool_k[layer_idx[0]], pool_v[layer_idx[0]]
  t, n_heads, d = q.shape
  kv_heads, _, page_size, _ = k_pages.shape
  freqs = jnp.asarray(_inv_freq(d, rope_theta))
  token_index, tile_seq = tile_plan(q_seq_ids, q_positions, block_tables.shape[0], block_q)
  tables, starts, lens = body.block_layout(block_tables, block_pos, block_len, page_size, 1)
  ctx = tables.shape[1] * page_size
  num_seqs = tables.shape[0]
  # Every sequence's keys gathered and rotated once, then shared by its tiles.
  k_pos, k_ok = jax.vmap(body.key_positions_reference, (0, 0, None))(starts, lens, page_size)
  k_seq = k_pages[:, tables].reshape(kv_heads, num_seqs, ctx, d)
  k_seq = body.rope_reference(k_seq, k_pos[None], freqs).astype(k_pages.dtype)
  v_seq = v_pages[:, tables].reshape(kv_heads, num_seqs, ctx, d)
  return _Gathered(
      t=t, kv_heads=kv_heads, group=n_heads // kv_heads, freqs=freqs,
      sm_scale=1.0 / math.sqrt(d) if sm_scale is None else sm_scale,
      q_pad=jnp.pad(q, ((0, 1), (0, 0), (0, 0))),
      pos_pad=jnp.concatenate([q_positions.astype(jnp.int32), jnp.full((1,), -1, jnp.int32)]),
      token_index=token_index, tile_seq=tile_seq, k_seq=k_seq, v_seq=v_seq, k_pos=k_pos,
      k_ok=k_ok)



