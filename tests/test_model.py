"""The paged model against an unpaged dense path, on tiny random configs."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokendance_jax import model
from tokendance_jax.config import TINY, AttentionConfig, CacheConfig

REF = AttentionConfig()
CHUNKED = AttentionConfig(impl="chunked")  # the CPU default
KERNEL = AttentionConfig(impl="pallas", interpret=True, block_q=4, pages_per_block=2)
TOL = 5e-5


def _pack(seqs, starts, cache_cfg, width=8, pad=3, capacity=(24, 24, 24)):
  """A ragged batch of seqs[i][starts[i]:]; sequence i owns pages for capacity[i] tokens."""
  ps = cache_cfg.page_size
  tables = np.zeros((len(seqs), width), np.int32)
  nxt = 1
  for i in range(len(seqs)):
    n = -(-capacity[i] // ps)
    tables[i, :n] = np.arange(nxt, nxt + n)
    nxt += n
  toks, pos, sid, last = [], [], [], []
  for i, (s, st) in enumerate(zip(seqs, starts, strict=True)):
    toks += list(s[st:])
    pos += list(range(st, len(s)))
    sid += [i] * (len(s) - st)
    last.append(len(toks) - 1)
  toks += [0] * pad
  pos += [-1] * pad
  sid += [0] * pad
  return model.Batch.contiguous(tokens=toks, positions=pos, seq_ids=sid, block_tables=tables,
                                logits_index=last, page_size=ps)


@pytest.fixture(scope="module")
def tiny():
  params = model.init_params(TINY, jax.random.PRNGKey(0))
  rng = np.random.default_rng(1)
  seqs = [rng.integers(3, TINY.vocab_size, size=n) for n in (20, 7, 13)]
  return params, seqs


@pytest.mark.parametrize("attn", [REF, CHUNKED, KERNEL], ids=["reference", "chunked", "kernel"])
def test_prefill_matches_dense(tiny, attn):
  params, seqs = tiny
  cc = CacheConfig(num_pages=32, page_size=8)
  logits, _ = model.forward(params, model.KVCache.create(TINY, cc),
                            _pack(seqs, [0, 0, 0], cc), cfg=TINY, attn=attn)
  for i, s in enumerate(seqs):
    dense = model.dense_forward(params, jnp.array(s, jnp.int32), cfg=TINY)[-1]
    np.testing.assert_allclose(logits[i], dense, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("attn", [REF, CHUNKED, KERNEL], ids=["reference", "chunked", "kernel"])
def test_chunked_prefill_then_decode_matches_dense(tiny, attn):
  """Prefill a prefix, then the rest as a second chunk, then one decode step."""
  params, seqs = tiny
  cc = CacheConfig(num_pages=32, page_size=8)
  cache = model.KVCache.create(TINY, cc)
  cut = [len(s) - 6 for s in seqs]
  prefixes = [s[:c] for s, c in zip(seqs, cut, strict=True)]
  _, cache = model.forward(params, cache, _pack(prefixes, [0] * 3, cc), cfg=TINY, attn=attn)
  body = [s[:-1] for s in seqs]
  _, cache = model.forward(params, cache, _pack(body, cut, cc), cfg=TINY, attn=attn)
  dec = _pack(seqs, [len(s) - 1 for s in seqs], cc, pad=0)
  logits, _ = model.forward(params, cache, dec, cfg=TINY, attn=attn, decode=True)
  for i, s in enumerate(seqs):
    dense = model.dense_forward(params, jnp.array(s, jnp.int32), cfg=TINY)[-1]
    np.testing.assert_allclose(logits[i], dense, atol=TOL, rtol=TOL)


def test_padding_tokens_write_nothing(tiny):
  params, seqs = tiny
  cc = CacheConfig(num_pages=32, page_size=8)
  _, cache = model.forward(params, model.KVCache.create(TINY, cc), _pack(seqs, [0] * 3, cc, pad=5),
                           cfg=TINY)
  used = 3 * 3  # three sequences own three 8-token pages each
  assert not np.any(np.asarray(cache.k[:, :, used + 1:]))  # pages past the tables untouched
  assert not np.any(np.asarray(cache.k[:, :, 0]))  # the null page stays zero


def test_gqa_ratio_one_and_bf16_cache(tiny):
  cfg = dataclasses.replace(TINY, n_kv_heads=4)
  params = model.init_params(cfg, jax.random.PRNGKey(2))
  _, seqs = tiny
  cc = CacheConfig(num_pages=32, page_size=8, dtype="bfloat16")
  logits, _ = model.forward(params, model.KVCache.create(cfg, cc), _pack(seqs, [0] * 3, cc),
                            cfg=cfg)
  dense = model.dense_forward(params, jnp.array(seqs[0], jnp.int32), cfg=cfg)[-1]
  np.testing.assert_allclose(logits[0], dense, atol=5e-2, rtol=5e-2)  # bf16 K/V storage


def test_attention_impl_is_checked():
  with pytest.raises(ValueError, match="impl='flash'; expected one of chunked, reference, pallas"):
    AttentionConfig(impl="flash")
  assert AttentionConfig.default_for_backend("cpu").impl == "chunked"
  assert AttentionConfig.default_for_backend("gpu").impl == "reference"  # see test_dispatch.py
