"""The kernels lower for the GPU from any machine, and the split-K combine is exact.

`jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))` runs Pallas'
Triton lowering on a CPU-only machine: it catches what the lowering rejects
(a gather on a sliced ref, a non-power-of-two block, a value slice) and
shows the grid the kernel launches with, without compiling Triton to PTX.
What only the Triton compiler or the hardware can reject is left to the
`gpu`-marked tests, which run on a GPU (benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokendance_jax.kernels import tuning

from tokendance_jax import kernels

pytest.importorskip("jax.experimental.pallas.triton")

# (name, query heads, KV heads, head_dim): SmolLM2-135M and Qwen2.5-7B attention.
SHAPES = [("smollm2", 9, 3, 64), ("qwen7b", 28, 4, 128)]
PAGE = 16


def _lower(fn, *args):
  return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def _grid(text: str, name: str) -> tuple[int, int, int]:
  call = next(line for line in text.splitlines() if f'name = "{name}"' in line)
  return tuple(int(re.search(rf"grid_{a} = (\d+)", call).group(1)) for a in "xyz")


@pytest.mark.parametrize("name, heads, kv_heads, d", SHAPES)
def test_decode_lowers_for_gpu_with_splits(name, heads, kv_heads, d):
  batch, width = 3, 40  # 640-token tables: widths and table lengths padded to powers of two
  tuned = tuning.TABLE["H100"]
  pool = jnp.zeros((2, kv_heads, batch * width + 1, PAGE, d), jnp.bfloat16)
  q = jnp.zeros((batch, heads, d), jnp.bfloat16)
  tables = jnp.zeros((batch, width), jnp.int32)
  positions = jnp.zeros((batch,), jnp.int32)

  def f(q, k, v, tables, positions):
    return kernels.paged_decode_attention(q, k, v, tables, positions, layer=jnp.int32(1),
                                          rope_theta=1e4, block_sizes=tuned.decode,
                                          max_position=3000)

  text = _lower(f, q, pool, pool, tables, positions)
  steps = 64 // tuned.decode.pages_per_block  # the width padded to 64
  splits = kernels.split_count(tuned.decode, batch * kv_heads, steps)
  assert splits > 1  # a small batch is split over its context
  assert _grid(text, "paged_decode_attention") == (batch, kv_heads, splits)


@pytest.mark.parametrize("name, heads, kv_heads, d", SHAPES)
def test_ragged_lowers_for_gpu(name, heads, kv_heads, d):
  t, seqs, width = 200, 4, 26
  tuned = tuning.TABLE["H100"].block_sizes(decode=False, group=heads // kv_heads)
  pool = jnp.zeros((kv_heads, seqs * width + 1, PAGE, d), jnp.bfloat16)
  q = jnp.zeros((t, heads, d), jnp.bfloat16)
  tables = jnp.zeros((seqs, width), jnp.int32)
  ids = jnp.zeros((t,), jnp.int32)

  def f(q, k, v, tables, positions, seq_ids):
    return kernels.ragged_paged_attention(q, k, v, tables, positions, seq_ids, rope_theta=1e4,
                                          block_sizes=tuned)

  text = _lower(f, q, pool, pool, tables, ids, ids)
  bq = tuned.block_q
  assert bq * (heads // kv_heads) <= 64  # packed rows fill one 64-row tile
  assert _grid(text, "ragged_paged_attention") == ((t + seqs * (bq - 1)) // bq, kv_heads, 1)


@pytest.mark.parametrize("d, dtype, match", [
    (16, jnp.bfloat16, "head_dim / 2 >= 16"),  # the QK halves would contract over 8
    (96, jnp.bfloat16, "power of two"),
])
def test_shapes_triton_cannot_compile_are_refused(d, dtype, match):
  pool = jnp.zeros((1, 4, PAGE, d), dtype)
  args = (jnp.zeros((1, 2, d), dtype), pool, pool, jnp.zeros((1, 2), jnp.int32),
          jnp.zeros((1,), jnp.int32))
  with pytest.raises(ValueError, match=re.escape(match)):
    kernels.paged_decode_attention(*args, rope_theta=1e4, interpret=False)
  out = kernels.paged_decode_attention(*args, rope_theta=1e4, interpret=True)  # runs
  assert out.shape == (1, 2, d)


def test_combine_splits_matches_one_softmax():
  """Per-split (o, m, l) from uneven key ranges, one empty, merge to the full softmax."""
  rng = np.random.default_rng(0)
  rows, d, mask = 3, 4, kernels.DEFAULT_MASK_VALUE
  scores = rng.standard_normal((rows, 10)) * 3
  values = rng.standard_normal((10, d))
  bounds = [(0, 7), (7, 7), (7, 10)]  # 7 keys, none, 3 keys
  o, m, total = [], [], []
  for lo, hi in bounds:
    s = scores[:, lo:hi]
    mx = s.max(axis=1) if hi > lo else np.full(rows, mask)
    p = np.exp(s - mx[:, None])
    o.append(p @ values[lo:hi])
    m.append(mx)
    total.append(p.sum(axis=1))
  out = kernels.combine_splits(*(jnp.asarray(np.stack(x), jnp.float32) for x in (o, m, total)))
  p = np.exp(scores - scores.max(axis=1, keepdims=True))
  np.testing.assert_allclose(out, (p / p.sum(axis=1, keepdims=True)) @ values, rtol=1e-5,
                             atol=1e-6)
  # A row no split saw (an idle slot) comes out zero, not NaN.
  empty = kernels.combine_splits(jnp.zeros((2, 1, d)), jnp.full((2, 1), mask), jnp.zeros((2, 1)))
  assert not np.asarray(empty).any()
