"""Segment-aligned block layouts: a block may start at any position and be partly full.

The same keys laid out contiguously (default layout) or segment by segment on
fresh pages (explicit block_pos / block_len, unused slots NaN) must give the
same attention output: this is what lets one physical page serve many
sequences at different offsets.
"""

import numpy as np
import pytest

from tokendance_jax import kernels

THETA = 10000.0
KVH, H, D, PS = 2, 6, 16, 8


def _layouts(seg_lens, rng, num_pages=24):
  """K/V for sum(seg_lens) tokens in two layouts: contiguous and one segment per page run."""
  total = sum(seg_lens)
  k_tok = rng.standard_normal((KVH, total, D)).astype(np.float32)
  v_tok = rng.standard_normal((KVH, total, D)).astype(np.float32)
  k = np.full((KVH, num_pages, PS, D), np.nan, np.float32)
  v = np.full_like(k, np.nan)
  pages = iter(rng.permutation(np.arange(1, num_pages)))
  # Contiguous: block j holds positions j*PS..
  contiguous = []
  for j in range(-(-total // PS)):
    p = next(pages)
    n = min(PS, total - j * PS)
    k[:, p, :n], v[:, p, :n] = k_tok[:, j * PS:j * PS + n], v_tok[:, j * PS:j * PS + n]
    contiguous.append(p)
  # Segmented: each segment starts a fresh page; positions stay contiguous.
  seg_pages, seg_pos, seg_len, start = [], [], [], 0
  for length in seg_lens:
    for off in range(0, length, PS):
      p = next(pages)
      n = min(PS, length - off)
      k[:, p, :n] = k_tok[:, start + off:start + off + n]
      v[:, p, :n] = v_tok[:, start + off:start + off + n]
      seg_pages.append(p)
      seg_pos.append(start + off)
      seg_len.append(n)
    start += length
  return k, v, contiguous, (seg_pages, seg_pos, seg_len)


def _rows(lists, width, fill):
  out = np.full((len(lists), width), fill, np.int32)
  for i, row in enumerate(lists):
    out[i, :len(row)] = row
  return out


@pytest.mark.parametrize("impl", ["reference", "kernel"])
def test_segment_layout_equals_contiguous(impl):
  rng = np.random.default_rng(0)
  seg_lens = [5, 11, 7, 1]
  total = sum(seg_lens)
  k, v, contiguous, (pages, pos, lens) = _layouts(seg_lens, rng)
  q_pos = np.array([0, 4, 5, 12, 15, 16, 22, 23], np.int32)
  q = rng.standard_normal((len(q_pos), H, D)).astype(np.float32)
  seq = np.zeros(len(q_pos), np.int32)
  if impl == "kernel":
    fn = lambda *a, **kw: kernels.ragged_paged_attention(  # noqa: E731
        *a, **kw, interpret=True, block_sizes=kernels.BlockSizes(block_q=4, pages_per_block=2))
    dec = lambda *a, **kw: kernels.paged_decode_attention(*a, **kw, interpret=True)  # noqa: E731
  else:
    fn, dec = kernels.ragged_paged_attention_reference, kernels.paged_decode_attention_reference
  width = 8
  base = fn(q, k, v, _rows([contiguous], width, 0), q_pos, seq, rope_theta=THETA)
  seg = fn(q, k, v, _rows([pages], width, 0), q_pos, seq, rope_theta=THETA,
           block_pos=_rows([pos], width, 0), block_len=_rows([lens], width, 0))
  assert not np.isnan(np.asarray(seg)).any()
  np.testing.assert_allclose(seg, base, atol=2e-6, rtol=2e-6)
  d_base = dec(q[-1:], k, v, _rows([contiguous], width, 0), q_pos[-1:], rope_theta=THETA)
  d_seg = dec(q[-1:], k, v, _rows([pages], width, 0), q_pos[-1:], rope_theta=THETA,
              block_pos=_rows([pos], width, 0), block_len=_rows([lens], width, 0))
  np.testing.assert_allclose(d_seg, d_base, atol=2e-6, rtol=2e-6)
  np.testing.assert_allclose(d_seg, np.asarray(seg)[-1:], atol=2e-6, rtol=2e-6)
  assert total == q_pos[-1] + 1


def test_block_pos_shape_mismatch_raises():
  k = np.zeros((KVH, 4, PS, D), np.float32)
  with pytest.raises(ValueError, match="block_pos"):
    kernels.ragged_paged_attention_reference(
        np.zeros((1, H, D), np.float32), k, k, np.zeros((1, 2), np.int32), np.zeros(1, np.int32),
        np.zeros(1, np.int32), rope_theta=THETA, block_pos=np.zeros((1, 3), np.int32))
