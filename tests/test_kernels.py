"""Paged attention kernels vs their jnp references vs a naive float64 numpy loop.

Every cache built here fills each slot that no query may read with NaN: the
null page 0, pages that no block table names, slots past a sequence's length
in its last page, and (for the 5-D pool) every layer but the one asked for. A
stray read then turns the output NaN instead of slightly wrong. Block tables
hand out shuffled, non-contiguous pages, and some cases map the SAME physical
page into two tables at different logical offsets (keys are stored before
RoPE, so the kernel must rotate each use by that sequence's logical position).

Two layouts: the plain one (block_pos / block_len left to their defaults,
block j = positions j*ps..), where shared pages sit at page-aligned offsets;
and the segment layout of `paging.BlockTable` (explicit block_pos /
block_len), where a shared segment lands at any offset and its partial last
block sits mid-sequence.

Checks, per case:
  (a) `*_reference` against `naive_attention`, a per-token, per-head float64
      loop written here from the definition (rope, softmax, weighted sum);
  (b) the Pallas kernel with interpret=True against the reference;
  (c) the same with interpret=False, marked `gpu` and skipped off-GPU (and
      for head_dim < 32, which the Triton lowering cannot compile).

Decode cases set `num_splits` so the split-K path meets splits of uneven
length and splits with no key at all (a short sequence in a long batch).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokendance_jax import kernels

# (atol, rtol) per dtype. The reference computes in float32 from inputs of the
# given dtype and rounds its output to that dtype; the kernel additionally
# rounds rotated q/k and the softmax weights to the pool dtype before its dots.
TOLERANCES = {
    "reference_vs_naive": {
        jnp.float32: (2e-5, 2e-5),  # float32 rope angles at positions ~100
        jnp.bfloat16: (1e-2, 1e-2),  # the reference's bf16 output rounding, 2^-9 relative
    },
    "kernel_vs_reference": {
        jnp.float32: (2e-5, 2e-5),
        jnp.bfloat16: (3e-2, 3e-2),  # bf16 q_rot, k_rot and p inside the kernel
    },
}

CHUNK = 6  # query tokens per sequence in the "chunk" cases
LAYER = 1  # the layer read from the 5-D pool


# ---------------------------------------------------------------------------
# The naive float64 definition.


def rope64(x, pos, theta):
  """Rotate-half RoPE in float64: x [..., d] at positions pos [...] -> [..., d]."""
  d = x.shape[-1]
  inv = float(theta) ** (-np.arange(0, d, 2, dtype=np.float64) / d)  # [d/2]
  angle = np.asarray(pos, np.float64)[..., None] * np.concatenate([inv, inv])  # [..., d]
  x1, x2 = x[..., : d // 2], x[..., d // 2:]
  return x * np.cos(angle) + np.concatenate([-x2, x1], axis=-1) * np.sin(angle)


def default_layout(block_tables, page_size):
  """The kernels' default block_pos / block_len: block j holds j*ps.. and is full."""
  width = block_tables.shape[1]
  pos = np.broadcast_to(np.arange(width) * page_size, block_tables.shape)
  return pos, np.full(block_tables.shape, page_size)


def naive_attention(q, k_pages, v_pages, block_tables, positions, seq_ids, *, layer,
                    rope_theta, sm_scale, block_pos=None, block_len=None):
  """Per token, per head: rope, causal softmax over keys 0..pos, weighted values.

  q [t, H, D]; pools [KV, P, ps, D] (or [L, KV, P, ps, D] with layer);
  block_tables / block_pos / block_len [S, width] (slot i of block j holds
  position block_pos[j] + i when i < block_len[j]); positions/seq_ids [t]
  -> [t, H, D] float64. Reads only slots a query may see and asserts each
  one is finite and that they hold each position 0..pos exactly once.
  """
  q = np.asarray(q, np.float64)
  k_all, v_all = np.asarray(k_pages, np.float64), np.asarray(v_pages, np.float64)
  if layer is not None:
    k_all, v_all = k_all[layer], v_all[layer]
  kv_heads, _, page_size, d = k_all.shape
  if block_pos is None:
    block_pos, block_len = default_layout(block_tables, page_size)
  t, n_heads, _ = q.shape
  group = n_heads // kv_heads
  scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
  slot = np.arange(page_size)
  out = np.zeros((t, n_heads, d))
  for i in range(t):
    pos, s = int(positions[i]), seq_ids[i]
    if pos < 0:
      continue  # padding query / idle slot: zero output
    all_pos = np.asarray(block_pos[s], np.int64)[:, None] + slot  # [width, ps]
    blocks, slots = np.nonzero((slot < np.asarray(block_len[s])[:, None]) & (all_pos <= pos))
    k_pos = all_pos[blocks, slots]  # [n]
    assert np.array_equal(np.sort(k_pos), np.arange(pos + 1)), "test layout is wrong"
    pages = block_tables[s][blocks]  # [n]
    for h in range(n_heads):
      keys = k_all[h // group, pages, slots]  # [n, D]
      values = v_all[h // group, pages, slots]  # [n, D]
      assert np.isfinite(keys).all() and np.isfinite(values).all(), "test cache is wrong"
      scores = rope64(keys, k_pos, rope_theta) @ rope64(q[i, h], pos, rope_theta) * scale  # [n]
      p = np.exp(scores - scores.max())
      out[i, h] = (p / p.sum()) @ values
  return out


# ---------------------------------------------------------------------------
# Building NaN-poisoned paged caches.

FAR = np.iinfo(np.int32).max // 2  # block_pos of a null table entry: after every query


def cdiv(a, b):
  return -(-a // b)


def plain_blocks(lengths, page_size, shares):
  """Default layout (block j = positions j*ps..); shares reuse whole aligned blocks.

  shares: (seq_a, block_a, seq_b, block_b) tuples; block_b of seq_b reuses the
    page of block_a of seq_a (both full blocks).
  Returns (rows of logical page ids 1.., fill {page id: valid slots}).
  """
  shared = {(b, jb): (a, ja) for a, ja, b, jb in shares}
  for (b, jb), (a, ja) in shared.items():
    assert (a, ja) < (b, jb), "a block may only reuse the page of an earlier block"
    assert lengths[a] >= (ja + 1) * page_size and lengths[b] >= (jb + 1) * page_size, \
        "shared blocks must be full in both sequences"
  rows, fill = [], {}
  for s, n in enumerate(lengths):
    row = []
    for j in range(cdiv(n, page_size)):
      a, ja = shared.get((s, j), (None, None))
      page = rows[a][ja] if a is not None and a < s else row[ja] if a == s else len(fill) + 1
      fill[page] = max(fill.get(page, 0), min(page_size, n - j * page_size))
      row.append(page)
    rows.append(row)
  return rows, fill


def segment_blocks(segments, layout, page_size):
  """Segment layout, as paging.BlockTable builds it.

  segments: (name, length) pairs; a named segment's pages are shared by every
    sequence that lists it, at whatever (unaligned) offset it lands there.
  layout: per sequence, segment names in order and optionally a final int:
    an open tail of that many tokens on full-size private blocks.
  Returns (rows of (page id, block_pos, block_len), fill {page id: valid slots}).
  """
  fill, seg_pages = {}, {}
  for name, n in segments:
    seg_pages[name] = [len(fill) + 1 + j for j in range(cdiv(n, page_size))]
    fill.update({p: min(page_size, n - j * page_size) for j, p in enumerate(seg_pages[name])})
  lengths = dict(segments)
  rows = []
  for parts in layout:
    row, end = [], 0
    for part in parts:
      if isinstance(part, str):  # a sealed segment: its last block may be partial
        n = lengths[part]
        row += [(p, end + j * page_size, min(page_size, n - j * page_size))
                for j, p in enumerate(seg_pages[part])]
      else:  # the open tail: full-size blocks, written up to `part` tokens
        assert part is parts[-1], "the tail comes last"
        n = part
        for j in range(cdiv(n, page_size)):
          fill[len(fill) + 1] = min(page_size, n - j * page_size)
          row.append((len(fill), end + j * page_size, page_size))
      end += n
    rows.append(row)
  return rows, fill


def make_cache(rng, *, page_size, kv_heads, head_dim, dtype, lengths=(), shares=(),
               segments=(), layout=(), layers=None, num_pages=None, width=None):
  """A NaN-poisoned page pool and block tables for the plain or the segment layout.

  Logical page ids are scattered onto shuffled physical pages 1..num_pages-1,
  leaving spares no table names. Pools are [KV, P, ps, D], or
  [layers, KV, P, ps, D] with data only in layer LAYER. Returns a dict:
  k_pages, v_pages, block_tables [S, width] int32, block_pos / block_len
  ([S, width] int32, or None for the plain layout), lengths [S].
  """
  if layout:
    rows, fill = segment_blocks(segments, layout, page_size)
  else:
    plain, fill = plain_blocks(lengths, page_size, shares)
    rows = [[(p, j * page_size, page_size) for j, p in enumerate(r)] for r in plain]
  num_pages = num_pages or len(fill) + 3  # null page + used + 2 spares
  width = width or max(len(r) for r in rows) + 1  # >= 1 null entry per row
  assert num_pages > len(fill) and width >= max(len(r) for r in rows)
  phys = np.concatenate([[0], rng.permutation(np.arange(1, num_pages))[:len(fill)]])
  table = np.zeros((3, len(rows), width), np.int64)  # page, block_pos, block_len
  table[1] = FAR
  for s, r in enumerate(rows):
    if r:
      table[:, s, :len(r)] = np.array(r).T
  table[0] = phys[table[0]]

  def pool():
    x = np.full((kv_heads, num_pages, page_size, head_dim), np.nan, np.float32)
    for page, n in fill.items():
      x[:, phys[page], :n] = rng.standard_normal((kv_heads, n, head_dim))
    if layers is not None:
      stack = np.full((layers, *x.shape), np.nan, np.float32)
      stack[LAYER] = x
      x = stack
    return np.asarray(x, dtype)

  tables = table.astype(np.int32)
  return dict(k_pages=pool(), v_pages=pool(), block_tables=tables[0],
              block_pos=tables[1] if layout else None, block_len=tables[2] if layout else None)


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  kind: str  # "prefill" | "chunk" | "recompute" | "decode"
  dtype: type
  page_size: int
  n_heads: int
  kv_heads: int
  lengths: tuple[int, ...] = ()  # plain layout: tokens per sequence
  segments: tuple[tuple[str, int], ...] = ()  # segment layout (see segment_blocks)
  layout: tuple[tuple[str | int, ...], ...] = ()
  block_q: int = 16
  pages_per_block: int = 4
  shares: tuple[tuple[int, int, int, int], ...] = ()
  layers: int | None = None  # 5-D pool read at layer=LAYER when set
  pad_tokens: int = 0  # ragged: extra queries at position -1
  idle: int = 0  # decode: idle batch slots (position -1)
  head_dim: int = 16
  num_splits: int = 0  # decode: context splits (0 = auto)
  min_rows: int = 1
  rope_theta: float = 10000.0
  sm_scale: float | None = None
  seed: int = 0

  @property
  def seq_lengths(self):
    if not self.layout:
      return self.lengths
    n = dict(self.segments)
    return tuple(sum(n[p] if isinstance(p, str) else p for p in parts) for parts in self.layout)

  @property
  def block_sizes(self):
    return kernels.BlockSizes(block_q=self.block_q, pages_per_block=self.pages_per_block,
                              num_splits=self.num_splits, min_rows=self.min_rows)


def _ragged_queries(rng, case):
  """(positions [t], seq_ids [t]) for prefill / chunk / recompute, plus padding."""
  pos, seq = [], []
  for s, n in enumerate(case.seq_lengths):
    if case.kind == "prefill":
      p = np.arange(n)
    elif case.kind == "chunk":
      p = np.arange(max(0, n - CHUNK), n)
    else:  # recompute: a scattered subset; the sequence's last token always included
      p = np.append(rng.choice(n - 1, size=(n - 1) // 3, replace=False), n - 1)
    pos.append(p)
    seq.append(np.full(len(p), s))
  pos.append(np.full(case.pad_tokens, -1))
  seq.append(rng.integers(0, len(case.seq_lengths), case.pad_tokens))
  pos, seq = np.concatenate(pos), np.concatenate(seq)
  if case.kind == "recompute":  # tokens of all sequences interleaved, padding in between
    order = rng.permutation(len(pos))
    pos, seq = pos[order], seq[order]
  return pos.astype(np.int32), seq.astype(np.int32)


@functools.cache
def build(case):
  """Inputs of one case as numpy arrays: a dict of the kernel's arguments."""
  rng = np.random.default_rng(case.seed)
  data = make_cache(
      rng, page_size=case.page_size, kv_heads=case.kv_heads, head_dim=case.head_dim,
      dtype=case.dtype, lengths=case.lengths, shares=case.shares, segments=case.segments,
      layout=case.layout, layers=case.layers)
  if case.kind == "decode":
    positions = np.array(case.seq_lengths, np.int32) - 1
    for _ in range(case.idle):  # idle slot; its table row is stale (real pages), not read
      at, stale = int(rng.integers(0, len(positions) + 1)), int(rng.integers(0, len(positions)))
      positions = np.insert(positions, at, -1)
      for name in ("block_tables", "block_pos", "block_len"):
        if data[name] is not None:
          data[name] = np.insert(data[name], at, data[name][stale], axis=0)
    seq_ids = np.arange(len(positions), dtype=np.int32)
  else:
    positions, seq_ids = _ragged_queries(rng, case)
  q = rng.standard_normal((len(positions), case.n_heads, case.head_dim)) * 1.5
  return dict(data, q=np.asarray(q, case.dtype), positions=positions, seq_ids=seq_ids,
              layer=None if case.layers is None else LAYER)


def call(fn, case, data, **kw):
  """Run a kernel (or reference) on a case's inputs -> numpy output in the case dtype."""
  args = [jnp.asarray(data[n]) for n in ("q", "k_pages", "v_pages", "block_tables", "positions")]
  if case.kind != "decode":
    args.append(jnp.asarray(data["seq_ids"]))
  layer = None if data["layer"] is None else jnp.int32(data["layer"])
  layout = {n: jnp.asarray(data[n]) for n in ("block_pos", "block_len") if data[n] is not None}
  out = fn(*args, **layout, layer=layer, rope_theta=case.rope_theta, sm_scale=case.sm_scale,
           **kw)
  return np.asarray(out)


def kernel_fn(case):
  return (kernels.paged_decode_attention if case.kind == "decode"
          else kernels.ragged_paged_attention)


def reference_fn(case):
  return (kernels.paged_decode_attention_reference if case.kind == "decode"
          else kernels.ragged_paged_attention_reference)


@functools.cache
def reference_output(case):
  # Default block sizes: the reference ignores them, and one value keeps its jit cache warm.
  return call(reference_fn(case), case, build(case))


def max_error(actual, expected):
  return float(np.max(np.abs(np.asarray(actual, np.float64) - expected), initial=0.0))


def assert_close(actual, expected, dtype, which, positions):
  """Tolerance check; padding rows must be exactly zero and nothing may be NaN."""
  actual = np.asarray(actual, np.float64)
  assert np.isfinite(actual).all(), f"NaN/inf in output rows {np.nonzero(~np.isfinite(actual))[0]}"
  assert not actual[positions < 0].any(), "padding / idle rows must be zero"
  atol, rtol = TOLERANCES[which][dtype]
  np.testing.assert_allclose(actual, expected, atol=atol, rtol=rtol,
                             err_msg=f"{which} max abs err {max_error(actual, expected):.3g}")


# Hand-picked rather than a cartesian product: each case is one interpret-mode
# compile, and together they cover dtype x page_size x GQA ratio x BlockSizes
# x query kind x (shared pages, ragged lengths incl. 1 / page multiples / long).
f32, bf16 = jnp.float32, jnp.bfloat16
CASES = [
    # Ragged: full prefill.
    Case("prefill-f32-ps8-mha-bq4-ppb1", "prefill", f32, 8, 2, 2, (1, 16, 21), block_q=4,
         pages_per_block=1, shares=((1, 0, 2, 1),)),
    Case("prefill-bf16-ps16-gqa3-bq16-ppb2", "prefill", bf16, 16, 6, 2, (16, 1, 40),
         block_q=16, pages_per_block=2, shares=((0, 0, 2, 1),), seed=1),
    # Ragged: a chunk (suffix) of each sequence; the long one spans many pages.
    Case("chunk-f32-ps32-gqa4-bq16-ppb4", "chunk", f32, 32, 12, 3, (130, 32, 5),
         shares=((0, 2, 1, 0),), pad_tokens=3, seed=2),
    Case("chunk-bf16-ps8-gqa4-bq4-ppb4", "chunk", bf16, 8, 4, 1, (72, 8, 2), block_q=4,
         shares=((0, 5, 1, 0),), seed=3),
    # Ragged: scattered recompute positions, interleaved across sequences.
    Case("recompute-bf16-ps8-gqa4-bq4-ppb2", "recompute", bf16, 8, 8, 2, (64, 24, 3),
         block_q=4, pages_per_block=2, shares=((0, 2, 0, 4), (0, 6, 1, 1)), pad_tokens=4,
         seed=4),
    Case("recompute-f32-ps16-gqa3-bq4-ppb4-theta1e5-scale", "recompute", f32, 16, 3, 1,
         (48, 33, 1), block_q=4, shares=((0, 0, 1, 1),), pad_tokens=2, rope_theta=1e5,
         sm_scale=0.3, seed=5),
    # Ragged over the 5-D layered pool (other layers all NaN).
    Case("layered-chunk-f32-ps8-gqa3-bq16-ppb2", "chunk", f32, 8, 6, 2, (27, 16), layers=3,
         pages_per_block=2, shares=((0, 2, 1, 1),), seed=6),
    # Decode, with idle slots (position -1, stale table rows).
    Case("decode-f32-ps8-mha-ppb1", "decode", f32, 8, 2, 2, (1, 8, 57), pages_per_block=1,
         shares=((1, 0, 2, 3),), idle=2, seed=8),
    Case("decode-bf16-ps8-mha-ppb1", "decode", bf16, 8, 3, 3, (9, 24, 3), pages_per_block=1,
         shares=((0, 0, 1, 1),), idle=1, seed=16),  # bf16 with 8-key steps (dot K/N = 8)
    Case("decode-bf16-ps16-gqa3-ppb4", "decode", bf16, 16, 9, 3, (16, 100, 2),
         shares=((0, 0, 1, 4),), idle=1, head_dim=32, seed=9),
    Case("decode-f32-ps32-gqa4-ppb2", "decode", f32, 32, 8, 2, (64, 31, 1, 96),
         pages_per_block=2, shares=((0, 1, 3, 0), (0, 0, 0, 1)), seed=10),
    Case("layered-decode-bf16-ps8-gqa4-ppb2", "decode", bf16, 8, 4, 1, (40, 9, 16),
         pages_per_block=2, layers=3, shares=((0, 1, 2, 0),), idle=1, seed=11),
    # Segment layout (explicit block_pos / block_len): shared segments at unaligned
    # offsets, partial blocks mid-sequence, one segment twice in the same table.
    Case("segments-prefill-f32-ps8-gqa3-bq4-ppb2", "prefill", f32, 8, 6, 2,
         segments=(("sys", 13), ("doc", 6)), layout=(("sys", 5), ("doc", "sys", 9), ("sys",)),
         block_q=4, pages_per_block=2, seed=12),
    Case("segments-recompute-bf16-ps16-gqa4-bq16-ppb4", "recompute", bf16, 16, 4, 1,
         segments=(("m1", 21), ("m2", 40)), layout=(("m1", "m2", 7), ("m2", "m1", 3), (2,)),
         pad_tokens=3, seed=13),
    Case("segments-chunk-f32-ps32-gqa3-bq16-ppb2", "chunk", f32, 32, 3, 1,
         segments=(("p", 45),), layout=(("p", 40), (3,), ("p", "p")), pages_per_block=2,
         seed=14),
    Case("segments-layered-decode-bf16-ps8-mha-ppb1", "decode", bf16, 8, 2, 2,
         segments=(("x", 11), ("y", 17)), layout=(("x", "y", 1), ("y", "x"), ("x", "x", 4)),
         layers=2, pages_per_block=1, idle=1, num_splits=2, seed=15),
]

# Model shapes: head_dim 64 / 128, GQA 1 / 3 / 8, pages of 16 / 32, lengths of 1 and
# at page boundaries. 160 keys in 32-key steps over 3 splits: steps 2 + 2 + 1; the
# 1- and 16-token sequences fill one split and leave two empty.
MODEL_CASES = [
    Case("decode-bf16-ps16-gqa8-d128-split3", "decode", bf16, 16, 8, 1, (1, 16, 33, 160),
         pages_per_block=2, shares=((2, 1, 3, 0),), idle=1, head_dim=128, num_splits=3,
         seed=17),
    Case("decode-f32-ps32-gqa3-d64-split4-rows16", "decode", f32, 32, 6, 2, (32, 64, 1, 97),
         pages_per_block=1, shares=((1, 1, 3, 2),), head_dim=64, num_splits=4, min_rows=16,
         seed=18),
    Case("decode-bf16-ps16-mha-d64-auto", "decode", bf16, 16, 2, 2, (48, 1, 17),
         pages_per_block=1, head_dim=64, rope_theta=1e5, seed=19),
    Case("prefill-bf16-ps16-gqa8-d128-bq4", "prefill", bf16, 16, 8, 1, (1, 16, 17, 48),
         block_q=4, pages_per_block=2, shares=((2, 0, 3, 0),), head_dim=128, seed=20),
    Case("recompute-f32-ps32-mha-d64-bq8", "recompute", f32, 32, 2, 2, (32, 65, 1),
         block_q=8, pages_per_block=1, shares=((0, 0, 1, 1),), pad_tokens=2, head_dim=64,
         seed=21),
    Case("chunk-bf16-ps32-gqa3-d64-rows16", "chunk", bf16, 32, 3, 1, (64, 33), min_rows=16,
         head_dim=64, rope_theta=1e6, seed=22),
]
CASES += MODEL_CASES


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
class TestPagedAttention:

  def test_reference_matches_naive(self, case):
    data = build(case)
    expected = naive_attention(
        data["q"], data["k_pages"], data["v_pages"], data["block_tables"], data["positions"],
        data["seq_ids"], layer=data["layer"], rope_theta=case.rope_theta,
        sm_scale=case.sm_scale, block_pos=data["block_pos"], block_len=data["block_len"])
    assert_close(reference_output(case), expected, case.dtype, "reference_vs_naive",
                 data["positions"])

  def test_kernel_interpret_matches_reference(self, case):
    data = build(case)
    out = call(kernel_fn(case), case, data, block_sizes=case.block_sizes, interpret=True)
    assert_close(out, np.asarray(reference_output(case), np.float64), case.dtype,
                 "kernel_vs_reference", data["positions"])

  @pytest.mark.gpu
  @pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (Triton lowering)")
  def test_kernel_gpu_matches_reference(self, case):
    if case.head_dim < 32:
      pytest.skip("Triton dots contract over head_dim / 2 >= 16")
    data = build(case)
    out = call(kernel_fn(case), case, data, block_sizes=case.block_sizes, interpret=False)
    assert_close(out, np.asarray(reference_output(case), np.float64), case.dtype,
                 "kernel_vs_reference", data["positions"])


@pytest.mark.parametrize("block_k", [8, 256])
@pytest.mark.parametrize("case", [c for c in CASES if c.kind != "decode" and c not in MODEL_CASES],
                         ids=lambda c: c.name)
def test_chunked_matches_reference(case, block_k):
  """The CPU fast path for ragged prefill: several key blocks per tile (8), or one (256)."""
  data = build(case)
  out = call(kernels.ragged_paged_attention_chunked, case, data, block_k=block_k)
  assert_close(out, np.asarray(reference_output(case), np.float64), case.dtype,
               "kernel_vs_reference", data["positions"])


# ---------------------------------------------------------------------------
# Property test: fixed shapes (one compile each), random segment layouts and queries.

_P_SEQS, _P_PS, _P_TOKENS = 3, 8, 12
_P_SEG_MAX, _P_TAIL_MAX = 20, 12
_P_WIDTH = 2 * cdiv(_P_SEG_MAX, _P_PS) + cdiv(_P_TAIL_MAX, _P_PS) + 1  # blocks per row
_P_PAGES = 1 + 2 * cdiv(_P_SEG_MAX, _P_PS) + _P_SEQS * cdiv(_P_TAIL_MAX, _P_PS) + 2


@settings(max_examples=15, deadline=None, database=None)
@given(seg_lengths=st.tuples(st.integers(1, _P_SEG_MAX), st.integers(1, _P_SEG_MAX)),
       n_queries=st.integers(1, _P_TOKENS), seed=st.integers(0, 2**32 - 1))
def test_property_random_layouts(seg_lengths, n_queries, seed):
  """Each row: 0-2 shared segments (repeats allowed) then a private tail of 0-12."""
  rng = np.random.default_rng(seed)
  segments = (("a", seg_lengths[0]), ("b", seg_lengths[1]))
  layout = []
  for _ in range(_P_SEQS):
    parts = tuple(rng.choice(["a", "b"], size=int(rng.integers(0, 3))).tolist())
    tail = int(rng.integers(0 if parts else 1, _P_TAIL_MAX + 1))
    layout.append(parts + ((tail,) if tail else ()))
  lengths = [sum(dict(segments)[p] if isinstance(p, str) else p for p in parts)
             for parts in layout]
  c = make_cache(rng, page_size=_P_PS, kv_heads=2, head_dim=16, dtype=np.float32,
                 segments=segments, layout=tuple(layout), num_pages=_P_PAGES, width=_P_WIDTH)
  cache = [c[n] for n in ("k_pages", "v_pages", "block_tables")]
  lay = dict(block_pos=c["block_pos"], block_len=c["block_len"])
  bs = kernels.BlockSizes(block_q=4, pages_per_block=2)
  common = dict(rope_theta=1e4, sm_scale=None, layer=None)

  def check(kernel, reference, q, positions, seq_ids, extra):
    jargs = [jnp.asarray(x) for x in (q, *cache, positions, *extra)]
    jlay = {k: jnp.asarray(v) for k, v in lay.items()}
    ref = np.asarray(reference(*jargs, **jlay, rope_theta=1e4))
    out = np.asarray(kernel(*jargs, **jlay, rope_theta=1e4, block_sizes=bs, interpret=True))
    expected = naive_attention(q, *cache, positions, seq_ids, **lay, **common)
    assert_close(ref, expected, jnp.float32, "reference_vs_naive", positions)
    assert_close(out, ref, jnp.float32, "kernel_vs_reference", positions)

  # Ragged: a random subset of all (sequence, position) pairs, padded to a fixed count.
  every = [(s, p) for s, n in enumerate(lengths) for p in range(n)]
  pick = rng.permutation(len(every))[:n_queries]
  seq_ids = np.array([every[i][0] for i in pick] + [0] * (_P_TOKENS - len(pick)), np.int32)
  positions = np.array([every[i][1] for i in pick] + [-1] * (_P_TOKENS - len(pick)), np.int32)
  q = rng.standard_normal((_P_TOKENS, 4, 16)).astype(np.float32)
  check(kernels.ragged_paged_attention, kernels.ragged_paged_attention_reference, q, positions,
        seq_ids, [seq_ids])
  chunked = functools.partial(kernels.ragged_paged_attention_chunked, block_k=8)
  check(chunked, kernels.ragged_paged_attention_reference, q, positions, seq_ids, [seq_ids])
  # Decode on the same cache: each row at a random position of its sequence, or idle.
  dpos = np.array([rng.integers(-1, n) for n in lengths], np.int32)
  check(kernels.paged_decode_attention, kernels.paged_decode_attention_reference, q[:_P_SEQS],
        dpos, np.arange(_P_SEQS), [])
