"""Argument validation of the paged attention kernels and references.

Wrong shapes raise ValueError naming the shapes; shapes the Triton lowering
cannot compile raise ValueError when compiled (interpret mode runs them).
"""

from __future__ import annotations

import re

import jax.numpy as jnp
import pytest

from tokendance_jax import kernels


def _ragged_args(t=5, heads=4, kv_heads=2, d=16, pages=6, ps=8, seqs=2, pps=3, layers=None):
  pool = (kv_heads, pages, ps, d) if layers is None else (layers, kv_heads, pages, ps, d)
  return dict(q=jnp.zeros((t, heads, d)), k_pages=jnp.zeros(pool), v_pages=jnp.zeros(pool),
              block_tables=jnp.zeros((seqs, pps), jnp.int32),
              q_positions=jnp.zeros((t,), jnp.int32), q_seq_ids=jnp.zeros((t,), jnp.int32))


def _decode_args(b=3, **kw):
  a = _ragged_args(t=b, seqs=b, **kw)
  return dict(q=a["q"], k_pages=a["k_pages"], v_pages=a["v_pages"],
              block_tables=a["block_tables"], positions=a["q_positions"])


def _with(args, **changes):
  return {**args, **changes}


RAGGED_ERRORS = [
    ("q-2d", _with(_ragged_args(), q=jnp.zeros((5, 64))), None, "(5, 64)"),
    ("head-dim", _with(_ragged_args(), q=jnp.zeros((5, 4, 32))), None, "(32)"),
    ("heads-not-multiple", _with(_ragged_args(), q=jnp.zeros((5, 3, 16))), None, "(3)"),
    ("positions-len", _with(_ragged_args(), q_positions=jnp.zeros((4,), jnp.int32)), None,
     "(4,)"),
    ("seq-ids-len", _with(_ragged_args(), q_seq_ids=jnp.zeros((6,), jnp.int32)), None, "(6,)"),
    ("tables-1d", _with(_ragged_args(), block_tables=jnp.zeros((6,), jnp.int32)), None, "(6,)"),
    ("kv-mismatch", _with(_ragged_args(), v_pages=jnp.zeros((2, 7, 8, 16))), None,
     "(2, 7, 8, 16)"),
    ("5d-without-layer", _ragged_args(layers=2), None, "(2, 2, 6, 8, 16)"),
    ("4d-with-layer", _ragged_args(), jnp.int32(0), "single layer"),
    ("block-pos-shape", _with(_ragged_args(), block_pos=jnp.zeros((2, 2), jnp.int32),
                              block_len=jnp.ones((2, 3), jnp.int32)), None, "(2, 2)"),
]

DECODE_ERRORS = [
    ("q-2d", _with(_decode_args(), q=jnp.zeros((3, 64))), None, "(3, 64)"),
    ("head-dim", _with(_decode_args(), q=jnp.zeros((3, 4, 8))), None, "(8)"),
    ("tables-batch", _with(_decode_args(), block_tables=jnp.zeros((4, 3), jnp.int32)), None,
     "(4, 3)"),
    ("positions-shape", _with(_decode_args(), positions=jnp.zeros((3, 1), jnp.int32)), None,
     "(3, 1)"),
    ("kv-mismatch", _with(_decode_args(), k_pages=jnp.zeros((2, 6, 16, 16))), None,
     "(2, 6, 16, 16)"),
    ("5d-without-layer", _decode_args(layers=2), None, "(2, 2, 6, 8, 16)"),
    ("block-len-shape", _with(_decode_args(), block_pos=jnp.zeros((3, 3), jnp.int32),
                              block_len=jnp.ones((3, 4), jnp.int32)), None, "(3, 4)"),
]

# A 3-D pool (the kv_heads axis missing) must be refused with a ValueError
# naming its shape before any axis of it is read.
_POOL_3D = pytest.param("pool-3d", None, None, "(6, 8, 16)")


@pytest.mark.parametrize("fn", [kernels.ragged_paged_attention,
                                kernels.ragged_paged_attention_reference],
                         ids=["kernel", "reference"])
@pytest.mark.parametrize("name, args, layer, shape_text", [*RAGGED_ERRORS, _POOL_3D],
                         ids=[e[0] for e in RAGGED_ERRORS] + ["pool-3d"])
def test_ragged_shape_errors(fn, name, args, layer, shape_text):
  if args is None:  # the 3-D pool case
    pool = jnp.zeros((6, 8, 16))
    args = _with(_ragged_args(), k_pages=pool, v_pages=pool)
  with pytest.raises(ValueError, match=re.escape(shape_text)):
    fn(**args, layer=layer, rope_theta=1e4, interpret=True)


@pytest.mark.parametrize("fn", [kernels.paged_decode_attention,
                                kernels.paged_decode_attention_reference],
                         ids=["kernel", "reference"])
@pytest.mark.parametrize("name, args, layer, shape_text", [*DECODE_ERRORS, _POOL_3D],
                         ids=[e[0] for e in DECODE_ERRORS] + ["pool-3d"])
def test_decode_shape_errors(fn, name, args, layer, shape_text):
  if args is None:
    pool = jnp.zeros((6, 8, 16))
    args = _with(_decode_args(), k_pages=pool, v_pages=pool)
  with pytest.raises(ValueError, match=re.escape(shape_text)):
    fn(**args, layer=layer, rope_theta=1e4, interpret=True)
