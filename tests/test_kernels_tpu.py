"""The Mosaic TPU kernels: TPU interpret mode against the references, and lowering for TPU.

No TPU here. Two checks stand in for one:

- Pallas' TPU interpret mode (`interpret=pltpu.InterpretParams(...)`) runs
  the kernels on CPU with TPU semantics: scalar prefetch in SMEM, DMAs and
  semaphores simulated, uninitialized VMEM filled with NaN and out-of-bounds
  reads raised. The cases are test_kernels' cases whose shapes the TPU
  layout takes (bf16 pages of 8 tokens are half a sublane tile and raise
  ValueError, tested below), plus two for what those exclude. Every cache is
  NaN-poisoned where no query may read, as in test_kernels.
- `jax.jit(...).trace(...).lower(lowering_platforms=("tpu",))` runs the
  Pallas-to-Mosaic lowering from CPU, inside a jitted model step. It catches
  what Pallas rejects for TPU (block shapes off the (8, 128) tiling,
  primitives Mosaic has no rule for, scalar-prefetch and DMA misuse). Mosaic's
  own layout passes and the TPU compiler run only on a TPU (libtpu), so what
  they reject is not caught here (docs/tpu.md).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from test_kernels import (
    CASES,
    Case,
    assert_close,
    build,
    call,
    kernel_fn,
    reference_output,
)

from tokendance_jax import kernels, model
from tokendance_jax.config import SMOLLM2_135M, TINY, AttentionConfig, CacheConfig

TPU = "mosaic_tpu"
f32, bf16 = jnp.float32, jnp.bfloat16


def _fits_tpu(case: Case) -> bool:
  try:
    kernels.lowering.check_tpu_shapes(head_dim=case.head_dim, page_size=case.page_size,
                                      dtype=case.dtype)
  except ValueError:
    return False
  return True


# What the TPU layout excludes from CASES (bf16 on 8-token pages), at TPU-legal sizes.
EXTRA = [
    Case("tpu-layered-decode-bf16-ps16-gqa4-ppb2", "decode", bf16, 16, 4, 1, (40, 9, 33),
         pages_per_block=2, layers=3, shares=((0, 1, 2, 0),), idle=1, seed=31),
    Case("tpu-segments-layered-decode-f32-ps8-mha-ppb1", "decode", f32, 8, 2, 2,
         segments=(("x", 11), ("y", 17)), layout=(("x", "y", 1), ("y", "x"), ("x", "x", 4)),
         layers=2, pages_per_block=1, idle=1, seed=32),
]
TPU_CASES = [c for c in CASES if _fits_tpu(c)] + EXTRA


@pytest.fixture(autouse=True)
def _reset_interpret_state():
  """The TPU interpreter keeps simulated memory and semaphores between calls; clear them
  after every case, so a failing one cannot leave state for the next."""
  yield
  pltpu.reset_tpu_interpret_mode_state()


def test_the_tpu_cases_cover_every_kind():
  kinds = {(c.kind, c.dtype, c.layers is not None, bool(c.layout)) for c in TPU_CASES}
  for kind in ("prefill", "chunk", "recompute", "decode"):
    assert {k[1] for k in kinds if k[0] == kind} == {f32, bf16}, kind
  assert any(k[2] for k in kinds if k[0] == "decode") and any(k[3] for k in kinds)


@pytest.mark.parametrize("case", TPU_CASES, ids=lambda c: c.name)
def test_tpu_kernel_interpret_matches_reference(case):
  data = build(case)
  out = call(kernel_fn(case), case, data, block_sizes=case.block_sizes, interpret=True,
             lowering=TPU)
  assert_close(out, np.asarray(reference_output(case), np.float64), case.dtype,
               "kernel_vs_reference", data["positions"])


def test_an_out_of_bounds_page_is_caught():
  """A block-table entry past the pool: the TPU interpreter raises on the DMA read."""
  case = next(c for c in TPU_CASES if c.kind == "decode")
  data = dict(build(case))
  tables = np.array(data["block_tables"])
  row = int(np.flatnonzero(data["positions"] >= 0)[0])  # a live sequence: its first page is read
  tables[row, 0] = data["k_pages"].shape[-3] + 5
  data["block_tables"] = tables
  with pytest.raises(Exception, match="(?i)out.of.bounds|bounds"):
    call(kernel_fn(case), case, data, block_sizes=case.block_sizes, interpret=True,
         lowering=TPU)


@pytest.mark.parametrize("dtype, page_size, head_dim, match", [
    (bf16, 8, 16, "multiple of 16 tokens per page for bfloat16"),
    (f32, 12, 16, "multiple of 8 tokens per page for float32"),
    (jnp.float16, 16, 16, "dtype float16"),
    (f32, 8, 15, "head_dim=15"),
    (f32, 8, 192, "head_dim=192"),
])
@pytest.mark.parametrize("decode", [True, False], ids=["decode", "ragged"])
def test_bad_shapes_raise_value_error(dtype, page_size, head_dim, match, decode):
  pool = jnp.zeros((2, 4, page_size, head_dim), dtype)
  q = jnp.zeros((3, 4, head_dim), dtype)
  tables = jnp.zeros((3, 2), jnp.int32)
  pos = jnp.zeros((3,), jnp.int32)
  with pytest.raises(ValueError, match=match):
    if decode:
      kernels.paged_decode_attention(q, pool, pool, tables, pos, rope_theta=1e4, interpret=True,
                                     lowering=TPU)
    else:
      kernels.ragged_paged_attention(q, pool, pool, tables, pos, pos, rope_theta=1e4,
                                     interpret=True, lowering=TPU)


def test_an_unknown_lowering_is_refused():
  pool = jnp.zeros((2, 4, 8, 16), f32)
  with pytest.raises(ValueError, match="lowering='mosaic'"):
    kernels.paged_decode_attention(jnp.zeros((1, 4, 16)), pool, pool, jnp.zeros((1, 2), jnp.int32),
                                   jnp.zeros((1,), jnp.int32), rope_theta=1e4, lowering="mosaic")
  with pytest.raises(ValueError, match="lowering='mosaic'"):
    AttentionConfig(lowering="mosaic")


def test_tpu_backend_defaults_to_the_tpu_kernels():
  attn = AttentionConfig.default_for_backend("tpu")
  assert (attn.impl, attn.lowering) == ("pallas", TPU)
  assert AttentionConfig.default_for_backend("cpu").lowering is None  # CPU: jnp path, untouched


def test_rotate_half_matrix():
  x = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
  r = np.asarray(kernels.tpu_attention.rotate_half_matrix(8, jnp.float32))
  np.testing.assert_array_equal(x @ r, np.concatenate([-x[:, 4:], x[:, :4]], axis=1))


# ---------------------------------------------------------------------------
# The model on the TPU kernels (interpret mode), against the unpaged dense path.

TPU_ATTN = AttentionConfig(impl="pallas", interpret=True, lowering=TPU, block_q=4,
                           pages_per_block=2)


def _batch(seqs, starts, page_size, width=8):
  tables = np.zeros((len(seqs), width), np.int32)
  toks, pos, sid, last = [], [], [], []
  for i, (s, st) in enumerate(zip(seqs, starts, strict=True)):
    tables[i, :3] = np.arange(1 + 3 * i, 4 + 3 * i)
    toks += list(s[st:])
    pos += list(range(st, len(s)))
    sid += [i] * (len(s) - st)
    last.append(len(toks) - 1)
  return model.Batch.contiguous(tokens=toks, positions=pos, seq_ids=sid, block_tables=tables,
                                logits_index=last, page_size=page_size)


def test_model_prefill_then_decode_on_tpu_kernels_matches_dense():
  params = model.init_params(TINY, jax.random.PRNGKey(0))
  rng = np.random.default_rng(1)
  seqs = [rng.integers(3, TINY.vocab_size, size=n) for n in (20, 7, 13)]
  cc = CacheConfig(num_pages=16, page_size=8)
  _, cache = model.forward(params, model.KVCache.create(TINY, cc),
                           _batch([s[:-1] for s in seqs], [0] * 3, 8), cfg=TINY, attn=TPU_ATTN)
  logits, _ = model.forward(params, cache, _batch(seqs, [len(s) - 1 for s in seqs], 8),
                            cfg=TINY, attn=TPU_ATTN, decode=True)
  for i, s in enumerate(seqs):
    dense = model.dense_forward(params, jnp.array(s, jnp.int32), cfg=TINY)[-1]
    np.testing.assert_allclose(logits[i], dense, atol=5e-5, rtol=5e-5)


# ---------------------------------------------------------------------------
# Lowering for the TPU platform from CPU, inside a jitted model step.


@pytest.mark.parametrize("decode", [True, False], ids=["decode", "prefill"])
def test_model_step_lowers_for_tpu(decode):
  """SmolLM2-135M shapes, bf16 pages of 16: the step lowers to one Mosaic call per layer scan."""
  cfg = SMOLLM2_135M
  cc = CacheConfig(num_pages=64, page_size=16, dtype="bfloat16")
  params = jax.eval_shape(lambda: model.init_params(cfg, jax.random.PRNGKey(0)))
  cache = jax.eval_shape(lambda: model.KVCache.create(cfg, cc))
  n = 4 if decode else 40
  batch = model.Batch.contiguous(
      tokens=[5] * n, positions=list(range(n)) if not decode else [30, 2, 17, 9],
      seq_ids=[0] * n if not decode else [0, 1, 2, 3],
      block_tables=np.zeros((4, 8), np.int32),
      logits_index=[n - 1] if not decode else [0, 1, 2, 3], page_size=16)
  attn = dataclasses.replace(AttentionConfig.default_for_backend("tpu"))

  def step(params, cache, batch):
    return model.forward(params, cache, batch, cfg=cfg, attn=attn, decode=decode)

  text = jax.jit(step).trace(params, cache, batch).lower(lowering_platforms=("tpu",)).as_text()
  name = "paged_decode_attention_tpu" if decode else "ragged_paged_attention_tpu"
  assert "tpu_custom_call" in text and name in text
  assert "triton" not in text.lower()
