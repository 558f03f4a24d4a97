"""Mosaic TPU variants of the paged decode and ragged prefill kernels.

Same entry signatures and references as the Triton kernels; `lowering`
decides which one an entry point runs. What differs is how pages reach the
compute units. The Triton kernels take the whole pool as one block and
gather pages through a pointer; a TPU core computes only on VMEM, and a
pool of every layer does not fit there. So here:

- block tables, per-block positions and lengths, each tile's sequence and
  live step count, and the layer are scalar-prefetched into SMEM
  (`PrefetchScalarGridSpec`);
- the pools stay in HBM (`memory_space=pl.ANY`); each step's pages are
  copied into one of two VMEM buffers by async DMA, and the next step's
  copies are started before the current step is computed (double
  buffering inside one program, so grid programs carry no state and both
  grid axes are "parallel");
- keys are rotated in VMEM from their positions: cos / sin of
  position x frequency, computed on the vector unit (no table gather,
  which Mosaic cannot lower), and rotate-half as a matmul by a signed
  permutation matrix (exact: one nonzero per column), so no value is
  sliced along lanes;
- softmax is online over the steps, in float32.

Layout for the (8, 128) tiles: query rows are padded to a multiple of the
sublane tile (8 rows for 32-bit, 16 for bf16) and pages must hold a
multiple of it (`lowering.check_tpu_shapes`). head_dim is not padded in
HBM; in VMEM Mosaic pads a 64-wide row to 128 lanes, so SmolLM2's
head_dim 64 uses half of each vector register and each page buffer takes
twice its size in VMEM. Packing two KV heads into one 128-lane row would
recover that; it is not done (no TPU here to measure it on).

One kernel body serves both entries: decode is a ragged batch of one token
per sequence whose rows are that token's query heads.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from . import attention_body as body
from .lowering import check_tpu_shapes, tpu_interpret, tpu_sublanes
from .rope import inv_freq as _inv_freq


def rotate_half_matrix(head_dim: int, dtype) -> jax.Array:
  """[d, d] R with x @ R == concat(-x2, x1) (rotate-half RoPE as a matmul)."""
  half = head_dim // 2
  r = np.zeros((head_dim, head_dim), np.float32)
  r[np.arange(half) + half, np.arange(half)] = -1.0  # out[j] = -x[j + h], j < h
  r[np.arange(half), np.arange(half) + half] = 1.0  # out[j + h] = x[j]
  return jnp.asarray(r, dtype)


def _kernel(
    # scalar prefetch (SMEM)
    tables_ref,  # [num_seqs * width] int32 physical page of each block, row-major
    starts_ref,  # [num_seqs * width] int32 position of each block's slot 0
    lens_ref,  # [num_seqs * width] int32 valid slots of each block
    tile_seq_ref,  # [n_tiles] int32 the sequence (table row) of each tile
    tile_steps_ref,  # [n_tiles] int32 live steps of each tile (0: nothing to read)
    tile_max_ref,  # [n_tiles] int32 the tile's last query position (-1: padding only)
    layer_ref,  # [1] int32 the layer to read
    # blocks in VMEM
    q_ref,  # [rows, d] rotated, scaled queries of one KV head (pool dtype)
    q_pos_ref,  # [rows, 1] int32 position per row; -1 marks a padding row
    freq_ref,  # [1, d] float32 RoPE frequency per feature (halves repeated)
    rot_ref,  # [d, d] rotate-half matrix (pool dtype)
    # pools in HBM
    k_hbm,  # [layers, kv_heads, num_pages, page_size, d] keys before RoPE
    v_hbm,
    # output
    o_ref,  # [rows, d]
    # scratch
    k_buf,  # [2, block_k, d] VMEM, pool dtype
    v_buf,
    sems,  # DMA semaphores [2 (k, v), 2 (buffer)]
    *,
    width: int,
    pages_per_block: int,
    mask_value: float,
):
  tile, head = pl.program_id(0), pl.program_id(1)
  page_size = k_hbm.shape[3]
  block_k = pages_per_block * page_size
  base = tile_seq_ref[tile] * width
  steps = tile_steps_ref[tile]
  max_pos = tile_max_ref[tile]
  layer = layer_ref[0]

  def copies(step, buf):
    """The DMAs of one step's pages into buffer `buf` (the same descriptors start and wait)."""
    out = []
    for j in range(pages_per_block):
      page = tables_ref[base + step * pages_per_block + j]
      rows = pl.ds(j * page_size, page_size)
      out.append(pltpu.make_async_copy(k_hbm.at[layer, head, page], k_buf.at[buf, rows],
                                       sems.at[0, buf]))
      out.append(pltpu.make_async_copy(v_hbm.at[layer, head, page], v_buf.at[buf, rows],
                                       sems.at[1, buf]))
    return out

  @pl.when(steps > 0)
  def _():
    for c in copies(0, 0):
      c.start()

  def layout(step, shape, axis):
    """Key positions and validity of a step's block_k slots, laid along `axis` of `shape`.

    Valid: inside the block's length and at most the tile's last query
    position (a full-length last page may hold padding past the sequence).
    """
    slot = lax.broadcasted_iota(jnp.int32, shape, axis)
    pos = jnp.zeros(shape, jnp.int32)
    ok = jnp.zeros(shape, jnp.bool_)
    for j in range(pages_per_block):
      entry = base + step * pages_per_block + j
      here = (slot >= j * page_size) & (slot < (j + 1) * page_size)
      offset = slot - j * page_size
      pos = jnp.where(here, starts_ref[entry] + offset, pos)
      ok = jnp.where(here, offset < lens_ref[entry], ok)
    return pos, ok & (pos <= max_pos)

  q = q_ref[...]
  q_pos = q_pos_ref[...]  # [rows, 1]
  rows, d = q.shape
  dtype = k_buf.dtype
  precision = lax.Precision.HIGHEST if dtype == jnp.float32 else None

  def dot(a, b, contract_b):
    return lax.dot_general(a, b, (((1,), (contract_b,)), ((), ())), precision=precision,
                           preferred_element_type=jnp.float32)

  def step_fn(step, carry):
    o, m, total = carry
    buf = step % 2
    for c in copies(step, buf):
      c.wait()

    @pl.when(step + 1 < steps)
    def _():
      for c in copies(step + 1, 1 - buf):
        c.start()

    pos_col, ok_col = layout(step, (block_k, 1), 0)  # keys along sublanes
    pos_row, ok_row = layout(step, (1, block_k), 1)  # keys along lanes
    k = k_buf[buf]  # [block_k, d]
    angle = pos_col.astype(jnp.float32) * freq_ref[...]  # [block_k, d]
    k_rot = (k.astype(jnp.float32) * jnp.cos(angle)
             + dot(k, rot_ref[...], 0) * jnp.sin(angle)).astype(dtype)
    s = dot(q, k_rot, 1)  # [rows, block_k]
    mask = ok_row & (pos_row <= q_pos)
    s = jnp.where(mask, s, mask_value)
    m_next = jnp.maximum(m, s.max(axis=1, keepdims=True))
    p = jnp.where(mask, jnp.exp(s - m_next), 0.0)
    alpha = jnp.exp(m - m_next)
    # Slots no row may read hold padding (NaN in tests): keep it out of 0 * NaN.
    v = jnp.where(ok_col, v_buf[buf], jnp.zeros((block_k, d), dtype))
    o = alpha * o + dot(p.astype(dtype), v, 0)
    return o, m_next, alpha * total + p.sum(axis=1, keepdims=True)

  init = (jnp.zeros((rows, d), jnp.float32), jnp.full((rows, 1), mask_value, jnp.float32),
          jnp.zeros((rows, 1), jnp.float32))
  o, _, total = lax.fori_loop(0, steps, step_fn, init)
  o_ref[...] = (o / jnp.where(total == 0.0, 1.0, total)).astype(o_ref.dtype)


def tile_steps(tables_pos, tables_len, max_pos, pages_per_block: int):
  """[n_tiles] live steps: blocks up to each tile's last query position, in steps
  (the blocks of a row are in position order, unused entries last)."""
  live = (tables_pos <= max_pos[:, None]) & (tables_len > 0)
  return -(-live.sum(axis=1).astype(jnp.int32) // pages_per_block)


def attend_tiles(q_tiles, pos_tiles, tile_seq, pool_k, pool_v, layer_idx, tables, starts, lens,
                 *, rope_theta: float, pages_per_block: int, mask_value: float, interpret,
                 name: str):
  """Run the kernel over tiles of rows of one sequence each.

  q_tiles [n_tiles, kv_heads, rows, d] rotated, scaled (pool dtype);
  pos_tiles [n_tiles, rows, 1] int32; tile_seq [n_tiles] int32;
  tables / starts / lens [num_seqs, width] int32 (width a multiple of
  pages_per_block). Returns [n_tiles, kv_heads, rows, d] in q's dtype.
  """
  n_tiles, kv_heads, rows, d = q_tiles.shape
  page_size = pool_k.shape[3]
  width = tables.shape[1]
  if width % pages_per_block:
    raise ValueError(f"block-table width {width} is not a multiple of {pages_per_block} pages "
                     "per step")
  block_k = pages_per_block * page_size
  max_pos = pos_tiles.max(axis=(1, 2)).astype(jnp.int32)  # [n_tiles]
  steps = tile_steps(starts[tile_seq], lens[tile_seq], max_pos, pages_per_block)
  freq = jnp.asarray(_inv_freq(d, rope_theta))[None, :]
  kernel = functools.partial(_kernel, width=width, pages_per_block=pages_per_block,
                             mask_value=mask_value)
  hbm = pl.BlockSpec(memory_space=pl.ANY)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=7,
      grid=(n_tiles, kv_heads),
      in_specs=[
          pl.BlockSpec((None, None, rows, d), lambda i, h, *_: (i, h, 0, 0)),
          pl.BlockSpec((None, rows, 1), lambda i, h, *_: (i, 0, 0)),
          pl.BlockSpec((1, d), lambda i, h, *_: (0, 0)),
          pl.BlockSpec((d, d), lambda i, h, *_: (0, 0)),
          hbm, hbm,
      ],
      out_specs=pl.BlockSpec((None, None, rows, d), lambda i, h, *_: (i, h, 0, 0)),
      scratch_shapes=[
          pltpu.VMEM((2, block_k, d), pool_k.dtype),
          pltpu.VMEM((2, block_k, d), pool_k.dtype),
          pltpu.SemaphoreType.DMA((2, 2)),
      ],
  )
  return pl.pallas_call(
      kernel,
      grid_spec=grid_spec,
      out_shape=jax.ShapeDtypeStruct((n_tiles, kv_heads, rows, d), q_tiles.dtype),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
      interpret=tpu_interpret(interpret),
      name=name,
  )(tables.reshape(-1), starts.reshape(-1), lens.reshape(-1), tile_seq.astype(jnp.int32),
    steps, max_pos, layer_idx, q_tiles, pos_tiles, freq, rotate_half_matrix(d, pool_k.dtype),
    pool_k, pool_v)


def round_rows(n: int, dtype, min_rows: int = 1) -> int:
  """Rows of a tile: n (at least min_rows) padded to a multiple of the sublane tile."""
  sub = tpu_sublanes(dtype)
  return -(-max(n, min_rows) // sub) * sub


def paged_decode_attention(q, k_pages, v_pages, block_tables, positions, *, block_pos, block_len,
                           layer, rope_theta, sm_scale, block_sizes, interpret, mask_value):
  """The TPU lowering of `kernels.paged_decode_attention` (arguments as there, checked)."""
  pool_k, pool_v, layer_idx = body.layered(k_pages, v_pages, layer)
  _, kv_heads, _, page_size, d = pool_k.shape
  check_tpu_shapes(head_dim=d, page_size=page_size, dtype=pool_k.dtype)
  batch, n_heads, _ = q.shape
  group = n_heads // kv_heads
  rows = round_rows(group, pool_k.dtype, block_sizes.min_rows)
  ppb = block_sizes.pages_per_block
  sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
  pos = positions.astype(jnp.int32)
  q_rot = body.rotate_queries(q, pos[:, None], rope_theta, sm_scale, pool_k.dtype)
  q_tiles = jnp.pad(q_rot.reshape(batch, kv_heads, group, d),
                    ((0, 0), (0, 0), (0, rows - group), (0, 0)))
  pos_tiles = jnp.broadcast_to(pos[:, None, None], (batch, rows, 1))
  tables, starts, lens = body.block_layout(block_tables, block_pos, block_len, page_size, ppb)
  out = attend_tiles(q_tiles, pos_tiles, jnp.arange(batch, dtype=jnp.int32), pool_k, pool_v,
                     layer_idx, tables, starts, lens, rope_theta=rope_theta,
                     pages_per_block=ppb, mask_value=mask_value, interpret=interpret,
                     name="paged_decode_attention_tpu")
  return out[:, :, :group].reshape(batch, n_heads, d).astype(q.dtype)


def ragged_paged_attention(q_tiles, pos_tiles, tile_seq, pool_k, pool_v, layer_idx, block_tables,
                           block_pos, block_len, *, rope_theta, block_sizes, interpret,
                           mask_value):
  """The TPU lowering of `kernels.ragged_paged_attention`, on its packed tiles.

  The entry point checks the shapes (`check_tpu_shapes`), packs tokens into
  tiles (as for the Triton kernel, rows padded by `round_rows`) and
  scatters the result back.
  """
  page_size = pool_k.shape[3]
  ppb = block_sizes.pages_per_block
  tables, starts, lens = body.block_layout(block_tables, block_pos, block_len, page_size, ppb)
  return attend_tiles(q_tiles, pos_tiles[..., None], tile_seq, pool_k, pool_v, layer_idx,
                      tables, starts, lens, rope_theta=rope_theta,
                      pages_per_block=ppb, mask_value=mask_value, interpret=interpret,
                      name="ragged_paged_attention_tpu")

