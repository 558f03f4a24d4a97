"""The online-softmax loop over pages shared by the decode and ragged-prefill kernels.

One program handles R query rows that share a sequence (so one block-table
row) and one KV head, over a range of its steps (a step is
`pages_per_block` consecutive block-table entries). Queries arrive rotated;
keys come un-rotated from the page pool and are rotated here, once per step,
in two halves from a cos/sin table gathered by each key's logical position.

Einsum letters used across kernels/: r query rows, k key slots in a compute
block, d head dim, h = d / 2, p pages.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from . import lowering
from .rope import cos_sin_table
from .rope import inv_freq as _inv_freq

# Finite, so a fully masked row never produces NaN through (-inf) - (-inf).
DEFAULT_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSizes:
  """Tuning knobs, kept apart from the logic (per-device values: `kernels.tuning`)."""

  block_q: int = 16  # ragged prefill: most query tokens per tile (fewer when the work is small)
  pages_per_block: int = 4  # pages per online-softmax step
  num_warps: int = 4
  num_stages: int = 2
  min_rows: int = 1  # smallest M of the kernels' dots (rows are a power of two >= this)
  num_splits: int = 0  # decode: programs per (sequence, KV head) over the context; 0 = auto
  split_programs: int = 256  # decode auto: aim for this many programs in the grid
  min_split_steps: int = 2  # decode auto: fewest steps a split is given

  def __post_init__(self):
    for name in ("pages_per_block", "min_rows"):
      v = getattr(self, name)
      if v < 1 or v & (v - 1):
        raise ValueError(f"{name}={v} must be a power of two")
    for name in ("block_q", "num_warps", "num_stages", "split_programs", "min_split_steps"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
    if self.num_splits < 0:
      raise ValueError(f"num_splits={self.num_splits} must be >= 0 (0 = auto)")

  def compiler_params(self):
    return lowering.compiler_params(num_warps=self.num_warps, num_stages=self.num_stages)


def next_pow2(n: int) -> int:
  return 1 if n <= 1 else 1 << (n - 1).bit_length()


def pages_per_step(block_sizes: BlockSizes, page_size: int) -> int:
  """Pages per online-softmax step, raised so a step holds >= 16 keys (Triton's smallest dot K)."""
  return max(block_sizes.pages_per_block, next_pow2(-(-16 // page_size)))


def check_pools(k_pages, v_pages) -> None:
  if k_pages.shape != v_pages.shape or k_pages.ndim not in (4, 5):
    raise ValueError(f"k_pages {k_pages.shape} / v_pages {v_pages.shape} must both be "
                     "[kv_heads, num_pages, page_size, head_dim] or [layers, ...] of that")


def layered(k_pages, v_pages, layer):
  """Accept one layer's pool [kv_heads, P, ps, d] or all layers' [L, kv_heads, P, ps, d].

  Returns (k [L, kv_heads, P, ps, d], v, layer [1] int32). Passing every
  layer plus an index lets a scan over layers hand the kernel the carried
  cache without slicing (and copying) one layer out.
  """
  check_pools(k_pages, v_pages)
  if k_pages.ndim == 4:
    if layer is not None:
      raise ValueError("layer is given but k_pages holds a single layer")
    return k_pages[None], v_pages[None], jnp.zeros((1,), jnp.int32)
  if layer is None:
    raise ValueError(f"k_pages {k_pages.shape} holds several layers; pass layer=")
  return k_pages, v_pages, jnp.reshape(layer, (1,)).astype(jnp.int32)


def block_layout(block_tables, block_pos, block_len, page_size: int, pages_per_block: int):
  """Default and pad the per-block position tables to a multiple of pages_per_block.

  Returns (tables, block_pos, block_len), each [num_seqs, padded] int32. By
  default block j starts at position j * page_size and is full.
  """
  num_seqs, width = block_tables.shape
  if block_pos is None:
    block_pos = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32) * page_size, (num_seqs, width))
  if block_len is None:
    block_len = jnp.full((num_seqs, width), page_size, jnp.int32)
  if block_pos.shape != block_tables.shape or block_len.shape != block_tables.shape:
    raise ValueError(f"block_pos {block_pos.shape} and block_len {block_len.shape} must match "
                     f"block_tables {block_tables.shape}")
  # Triton loads need power-of-two shapes: pad the width to one (at least one step).
  pad = ((0, 0), (0, max(next_pow2(width), pages_per_block) - width))
  far = jnp.iinfo(jnp.int32).max // 2  # padding blocks start after every query
  return (jnp.pad(block_tables.astype(jnp.int32), pad),
          jnp.pad(block_pos.astype(jnp.int32), pad, constant_values=far),
          jnp.pad(block_len.astype(jnp.int32), pad))


def key_positions_reference(block_pos, block_len, page_size: int):
  """[width] block tables -> ([width * page_size] key positions, validity)."""
  slot = jnp.arange(page_size, dtype=jnp.int32)
  k_pos = (block_pos[:, None] + slot[None, :]).reshape(-1)
  k_ok = (slot[None, :] < block_len[:, None]).reshape(-1)
  return k_pos, k_ok


def _dot(a, b, contract_b: int):
  """a: [m, c] x b (contract axis `contract_b` of b) -> float32 [m, n]."""
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return lax.dot_general(
      a, b, (((1,), (contract_b,)), ((), ())), precision=precision,
      preferred_element_type=jnp.float32)


def rotate_queries(q, pos, theta: float, sm_scale: float, dtype):
  """q [..., d] at positions pos [...] -> rotated, scaled by sm_scale, cast to dtype (jnp).

  Run by the kernel entries before the kernel: queries are rotated once,
  keys (shared pages, any offset) inside the kernel.
  """
  freqs = jnp.asarray(_inv_freq(q.shape[-1], theta))
  return (rope_reference(q, pos, freqs) * sm_scale).astype(dtype)


def rope_tables(head_dim: int, theta: float, max_position: int | None, width: int,
                page_size: int):
  """(cos, sin) [length, d/2] for every key position a kernel can meet.

  max_position bounds the positions; by default pages_per_seq * page_size,
  which holds by the kernels' contract: a row's keys hold positions 0..p,
  each in its own slot, so p < pages_per_seq * page_size. Larger positions
  are clamped to the last row (wrong, but never out of bounds).
  """
  return cos_sin_table(max_position or width * page_size, head_dim, theta)


def live_steps(block_pos, block_len, max_pos, pages_per_block: int):
  """Steps holding a block that starts at or before max_pos (blocks are in position order)."""
  live = (block_pos <= max_pos) & (block_len > 0)
  return lax.div(jnp.sum(live.astype(jnp.int32)) + pages_per_block - 1, pages_per_block)


def attend_steps(
    q1,  # [r, h] rotated, scaled queries (first half of the head dim), compute dtype
    q2,  # [r, h] second half
    q_pos,  # [r] int32 logical position per row; -1 marks a padding row
    layer,  # int32 scalar: the layer of the pools to read
    k_pages_ref,  # [layers, num_pages, page_size, d] un-rotated keys of this KV head
    v_pages_ref,  # [layers, num_pages, page_size, d]
    block_table_ref,  # [pages_per_seq] physical page of each logical block
    block_pos_ref,  # [pages_per_seq] logical position of each block's slot 0 (increasing)
    block_len_ref,  # [pages_per_seq] valid slots of each block (0 = unused entry)
    cos_ref,  # [positions, h] float32 rotation table
    sin_ref,  # [positions, h] float32
    first,  # int32: first step to visit
    last,  # int32: one past the last step
    *,
    pages_per_block: int,
    mask_value: float,
):
  """Causal-by-position online softmax of the rows over steps [first, last).

  Returns (o [r, d] float32 un-normalized, m [r] running max, l [r] running
  sum); a row that saw no key has m = mask_value, l = 0, o = 0. Slot i of
  block j holds the key at position block_pos[j] + i when i < block_len[j];
  other slots are never read as data, so a page can be shared by sequences
  that hold it at different offsets.
  """
  rows, half = q1.shape
  page_size, head_dim = k_pages_ref.shape[2], k_pages_ref.shape[3]
  block_k = pages_per_block * page_size
  compute_dtype = k_pages_ref.dtype
  last_row = cos_ref.shape[0] - 1
  max_pos = jnp.max(q_pos)
  slot = lax.broadcasted_iota(jnp.int32, (pages_per_block, page_size), 1)

  def body(i, carry):
    o, m, total = carry
    blocks = pl.ds(i * pages_per_block, pages_per_block)
    pages = block_table_ref[blocks]  # [pages_per_block]
    k_pos = (block_pos_ref[blocks][:, None] + slot).reshape(block_k)  # [k]
    k_ok = (slot < block_len_ref[blocks][:, None]).reshape(block_k) & (k_pos <= max_pos)
    at = jnp.clip(k_pos, 0, last_row)
    cos, sin = cos_ref[at], sin_ref[at]  # [k, h]
    # One indexer per load (the Triton lowering rejects a gather on a sliced ref);
    # the halves are two loads, so no loaded value is ever sliced.
    k1 = k_pages_ref[layer, pages, :, pl.ds(0, half)].reshape(block_k, half)
    k2 = k_pages_ref[layer, pages, :, pl.ds(half, half)].reshape(block_k, half)
    k1, k2 = k1.astype(jnp.float32), k2.astype(jnp.float32)
    k1r = (k1 * cos - k2 * sin).astype(compute_dtype)  # [k, h]
    k2r = (k2 * cos + k1 * sin).astype(compute_dtype)
    s = _dot(q1, k1r, 1) + _dot(q2, k2r, 1)  # [r, k]
    mask = k_ok[None, :] & (k_pos[None, :] <= q_pos[:, None])
    s = jnp.where(mask, s, mask_value)
    m_next = jnp.maximum(m, s.max(axis=1))
    p = jnp.where(mask, jnp.exp(s - m_next[:, None]), 0.0)
    alpha = jnp.exp(m - m_next)
    v = v_pages_ref[layer, pages].reshape(block_k, head_dim)  # [k, d]
    # Slots no row may read hold padding (NaN in tests): zero them so it
    # cannot leak through 0 * NaN.
    v = jnp.where(k_ok[:, None], v, jnp.zeros_like(v))
    o = alpha[:, None] * o + _dot(p.astype(v.dtype), v, 0)
    return o, m_next, alpha * total + p.sum(axis=1)

  o = jnp.zeros((rows, head_dim), jnp.float32)
  m = jnp.full((rows,), mask_value, jnp.float32)
  total = jnp.zeros((rows,), jnp.float32)
  return lax.fori_loop(first, last, body, (o, m, total))


def attend_split(
    q_ref,  # [r, d] rotated, scaled queries, compute dtype
    q_pos_ref,  # [r] int32 position per row; -1 marks a padding row
    layer_ref,  # [1] int32 layer to read
    k_pages_ref,  # [layers, num_pages, page_size, d]
    v_pages_ref,  # [layers, num_pages, page_size, d]
    block_table_ref,  # [pages_per_seq]
    block_pos_ref,  # [pages_per_seq]
    block_len_ref,  # [pages_per_seq]
    cos_ref,  # [positions, h]
    sin_ref,  # [positions, h]
    split,  # int32: which share of the live steps this program takes
    *,
    num_splits: int,
    pages_per_block: int,
    mask_value: float,
):
  """One program of either kernel: share `split` of `num_splits` of the live steps.

  The live steps (those up to the rows' last position, so causal for a
  prefill tile) are cut into num_splits even shares, the last one short, a
  share past the end empty. Returns attend_steps' (o, m, l).
  """
  half = q_ref.shape[1] // 2
  q_pos = q_pos_ref[...]
  steps = live_steps(block_pos_ref[...], block_len_ref[...], jnp.max(q_pos), pages_per_block)
  per_split = lax.div(steps + num_splits - 1, num_splits)
  first = split * per_split
  return attend_steps(
      q_ref[:, pl.ds(0, half)], q_ref[:, pl.ds(half, half)], q_pos, layer_ref[0], k_pages_ref,
      v_pages_ref, block_table_ref, block_pos_ref, block_len_ref, cos_ref, sin_ref, first,
      jnp.minimum(first + per_split, steps), pages_per_block=pages_per_block,
      mask_value=mask_value)


def check_query(q, k_pages, v_pages, what: str) -> None:
  """Shape checks shared by both kernels: q [n, heads, d] against the pools."""
  if q.ndim != 3:
    raise ValueError(f"q must be [{what}, heads, head_dim], got shape {q.shape}")
  check_pools(k_pages, v_pages)
  if q.shape[-1] != k_pages.shape[-1]:
    raise ValueError(f"head_dim of q ({q.shape[-1]}) != head_dim of pages ({k_pages.shape[-1]})")
  if q.shape[1] % k_pages.shape[-4]:
    raise ValueError(f"query heads ({q.shape[1]}) not a multiple of kv heads ({k_pages.shape[-4]})")


def rope_reference(x, pos, inv_freq):
  """Plain rotate-half RoPE for the references: x [..., d], pos [...] -> [..., d] float32."""
  angle = pos.astype(jnp.float32)[..., None] * inv_freq
  x = x.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  return x * jnp.cos(angle) + jnp.concatenate([-x2, x1], axis=-1) * jnp.sin(angle)


def softmax_attend_reference(q, k, v, mask, sm_scale, mask_value=DEFAULT_MASK_VALUE):
  """q [r, d], k/v [n, d] (already rotated), mask [r, n] -> [r, d] float32; all-masked rows -> 0."""
  s = jnp.einsum("rd,nd->rn", q, k, precision=lax.Precision.HIGHEST) * sm_scale
  s = jnp.where(mask, s, mask_value)
  p = jnp.where(mask, jnp.exp(s - s.max(axis=-1, keepdims=True)), 0.0)
  denom = p.sum(axis=-1, keepdims=True)
  # Slots no row may see hold padding (NaN in tests): keep them out of 0 * NaN.
  v = jnp.where(mask.any(axis=0)[:, None], v.astype(jnp.float32), 0.0)
  out = jnp.einsum("rn,nd->rd", p, v, precision=lax.Precision.HIGHEST)
  return out / jnp.where(denom == 0.0, 1.0, denom)

