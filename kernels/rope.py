"""Rotary position embedding (rotate-half layout) shared by the attention kernels.

Keys live in the page pool *before* RoPE; kernels rotate them from each
token's logical position as they are read, so one physical page serves any
sequence at any offset.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np


@functools.cache
def inv_freq(head_dim: int, theta: float) -> np.ndarray:
  """[head_dim] float32: frequency of each feature (the half-table repeated twice)."""
  half = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
  freqs = (1.0 / (np.float32(theta) ** half)).astype(np.float32)
  return np.concatenate([freqs, freqs])


def cos_sin_table(length: int, head_dim: int, theta: float):
  """(cos, sin), each [length, head_dim // 2] float32: the rotation at positions 0..length-1.

  The kernels gather rows of it by key position and rotate the two halves
  of each key (x1 * cos - x2 * sin, x2 * cos + x1 * sin): no rotate-half
  matmul and no slicing of a loaded value, which Triton cannot do. Angles
  are formed exactly as `apply_rope` forms them (float32 position times
  float32 frequency), so kernels and references rotate identically.
  """
  half = jnp.asarray(inv_freq(head_dim, theta)[: head_dim // 2])
  angle = jnp.arange(length, dtype=jnp.float32)[:, None] * half[None, :]
  return jnp.cos(angle), jnp.sin(angle)


def rotate_half(x):
  """x: [..., D] -> concat(-x2, x1)."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x, positions, theta: float):
  """Rotate x: [..., T, H, D] at positions [..., T] (float32 math)."""
  freqs = jnp.asarray(inv_freq(x.shape[-1], theta))
  angle = positions.astype(jnp.float32)[..., None, None] * freqs  # [..., T, 1, D]
  xf = x.astype(jnp.float32)
  return (xf * jnp.cos(angle) + rotate_half(xf) * jnp.sin(angle)).astype(x.dtype)
