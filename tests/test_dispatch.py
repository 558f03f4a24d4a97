"""Honest attention dispatch, the per-device tuning table, and the split / tile policies.

The default attention on a backend is the fastest correct path measured
there: on GPU the kernels only where `kernels.tuning` records a measurement
of them beating XLA for that device kind, XLA's jnp path otherwise.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from tokendance_jax.kernels import tuning

from tokendance_jax import kernels, model
from tokendance_jax.config import TINY, AttentionConfig, default_cache_dtype

H100, H200 = "NVIDIA H100 80GB HBM3", "NVIDIA H200"


@pytest.mark.parametrize("kind", [H100, H200, "NVIDIA A100-SXM4-40GB", "Tesla T4"])
def test_gpu_default_is_xla_without_a_measurement(kind):
  attn = AttentionConfig.default_for_backend("gpu", device_kind=kind)
  assert attn.impl == "reference" and attn.tuning is None
  assert not tuning.for_device(kind).kernel_faster  # nothing measured the new kernels yet


def test_gpu_kernel_default_follows_the_table(monkeypatch):
  faster = dataclasses.replace(tuning.TABLE["H100"], kernel_faster=True,
                               measured="docs/results/some_gpu_check/kernel_bench.json")
  monkeypatch.setitem(tuning.TABLE, "H100", faster)
  attn = AttentionConfig.default_for_backend("gpu", device_kind=H100)
  assert attn.impl == "pallas" and not attn.interpret and attn.tuning is faster
  # The other kind keeps XLA: one kind's measurement says nothing of another.
  assert AttentionConfig.default_for_backend("gpu", device_kind=H200).impl == "reference"


def test_force_kernel_and_cpu_defaults():
  forced = AttentionConfig.default_for_backend("gpu", device_kind=H200, force_kernel=True)
  assert forced.impl == "pallas" and forced.tuning is tuning.TABLE["H200"]
  assert AttentionConfig.default_for_backend("cpu").impl == "chunked"
  cpu_kernel = AttentionConfig.default_for_backend("cpu", force_kernel=True)
  assert cpu_kernel.impl == "pallas" and cpu_kernel.interpret


def test_a_faster_claim_needs_its_measurement():
  with pytest.raises(ValueError, match="measured"):
    tuning.DeviceTuning(kernel_faster=True)
  with pytest.raises(ValueError, match="prefill_rows=48"):
    tuning.DeviceTuning(prefill_rows=48)


def test_lookup_by_device_kind():
  assert tuning.for_device(H100) is tuning.TABLE["H100"]
  assert tuning.for_device("nvidia h200") is tuning.TABLE["H200"]
  assert tuning.for_device("cpu") is tuning.DEFAULT
  assert tuning.for_device(None) is tuning.DEFAULT


def test_attention_args_take_the_tuned_block_sizes():
  cfg = dataclasses.replace(TINY, n_heads=6, n_kv_heads=2)  # group 3
  tuned = tuning.TABLE["H100"]
  attn = AttentionConfig(impl="pallas", tuning=tuned)
  batch = model.Batch.contiguous(tokens=[1, 2], positions=[0, 1], seq_ids=[0, 0],
                                 block_tables=[[1]], logits_index=[1], page_size=8)
  q = jnp.zeros((2, 6, TINY.head_dim))
  pool = jnp.zeros((2, 2, 4, 8, TINY.head_dim))
  _, kw = model.attention_args(q, pool, pool, 0, batch, cfg, attn, decode=False)
  assert kw["block_sizes"].block_q == tuned.prefill_rows // 3  # 21 tokens x 3 heads = 63 rows
  assert kw["interpret"] is False
  _, kw = model.attention_args(q, pool, pool, 0, batch, cfg, attn, decode=True)
  assert kw["block_sizes"] is tuned.decode
  _, kw = model.attention_args(q, pool, pool, 0, batch, cfg, AttentionConfig(), decode=False)
  assert kw["block_sizes"] == kernels.BlockSizes() and "interpret" not in kw


def test_cache_dtype_per_backend():
  assert default_cache_dtype("gpu") == "bfloat16"
  assert default_cache_dtype("tpu") == "bfloat16"
  assert default_cache_dtype("cpu") == "float32"


@pytest.mark.parametrize("programs, steps, expected", [
    (1 * 4, 64, 32),  # batch 1, 4 KV heads: 66 wanted, capped at 64 steps / 2 per split
    (16 * 4, 64, 5),  # cdiv(264, 64)
    (64 * 4, 16, 2),  # cdiv(264, 256)
    (128 * 4, 64, 1),  # enough programs already
    (4, 1, 1),  # one step: one split
])
def test_split_count_policy(programs, steps, expected):
  assert kernels.split_count(tuning.TABLE["H100"].decode, programs, steps) == expected


def test_split_count_explicit():
  assert kernels.split_count(kernels.BlockSizes(num_splits=3), 8, 16) == 3
  assert kernels.split_count(kernels.BlockSizes(num_splits=8), 8, 5) == 5  # no split past a step


def test_block_sizes_are_checked():
  with pytest.raises(ValueError, match="min_rows=3"):
    kernels.BlockSizes(min_rows=3)
  with pytest.raises(ValueError, match="num_splits=-1"):
    kernels.BlockSizes(num_splits=-1)


@pytest.mark.parametrize("block_q, t, seqs, expected", [
    (16, 64, 2, 16), (16, 8, 8, 1), (16, 24, 8, 3), (21, 4096, 4, 21), (16, 3, 8, 1)])
def test_tile_tokens_follow_the_work(block_q, t, seqs, expected):
  assert kernels.tile_tokens(block_q, t, seqs) == expected


def test_tile_plan_bound_is_tight():
  """The grid bound (t + min(S, t) * (bq - 1)) // bq is met when every sequence has
  one token past a multiple of bq, and every real tile comes before the empty ones."""
  bq, seqs = 4, 3
  counts = [5, 9, 1]  # 2 + 3 + 1 = 6 tiles; bound (15 + 3 * 3) // 4 = 6
  seq_ids = np.concatenate([np.full(c, s) for s, c in enumerate(counts)]).astype(np.int32)
  positions = np.concatenate([np.arange(c) for c in counts]).astype(np.int32)
  token_index, tile_seq = kernels.tile_plan(jnp.asarray(seq_ids), jnp.asarray(positions), seqs,
                                            bq)
  token_index = np.asarray(token_index)
  assert token_index.shape == (6, bq)
  assert (token_index < len(seq_ids)).any(axis=1).all()  # no empty tile
  assert sorted(token_index[token_index < len(seq_ids)].tolist()) == list(range(len(seq_ids)))
  assert np.asarray(tile_seq).tolist() == [0, 0, 1, 1, 1, 2]
