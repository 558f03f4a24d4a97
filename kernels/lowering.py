"""The one place the GPU lowering of the Pallas kernels is chosen, and what it requires.

Today that is Pallas' Triton lowering (`jax.experimental.pallas.triton`),
present in jax 0.10 and 0.11. jax 0.11.0 deprecates it and announces its
removal in favour of Mosaic GPU (see docs/gpu.md for what a Mosaic GPU port
would take). `pallas_call` picks the Triton backend because the compiler
params passed are Triton's; nothing else in kernels/ names a backend.

What the Triton lowering needs from a kernel, checked here so a bad shape
fails with a ValueError before lowering instead of deep inside Triton:

- every block and every value a power of two in each dimension;
- a `dot` needs its contraction (K) dimension >= 16 for 16-bit inputs
  (>= 8 for float32). M and N may be small: Triton >= 3.2 pads them onto the
  tensor cores itself (its NVIDIA backend's `min_dot_size` is (1, 1, 16)),
  older Triton required 16. The smallest rows (M) a kernel uses is a tuning
  knob (`BlockSizes.min_rows`) so that can be raised again without touching
  the logic. Pallas emits `tt.dot` directly and checks none of this.
"""

from __future__ import annotations

import warnings

LOWERING = "triton"  # the Pallas GPU backend the kernels are written for


def compiler_params(*, num_warps: int, num_stages: int):
  """Triton compiler params for `pallas_call` (None where this jax has no Triton lowering)."""
  try:
    with warnings.catch_warnings():  # 0.11 deprecates the backend; say so once, in docs/gpu.md
      warnings.simplefilter("ignore", DeprecationWarning)
      from jax.experimental.pallas import triton as pltriton
  except ImportError:  # pragma: no cover - a jax without the Triton lowering: interpret only
    return None
  return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _pow2(n: int) -> bool:
  return n >= 1 and not n & (n - 1)


def check_compiled_shapes(*, head_dim: int, block_k: int, dtype, interpret) -> None:
  """Raise ValueError where the Triton lowering could not compile the kernel (interpret: no check).

  The QK product contracts over half the head dim (keys are rotated in
  halves); the PV product contracts over block_k keys.
  """
  if interpret:
    return
  import numpy as np

  min_k = 8 if np.dtype(dtype).itemsize == 4 else 16
  if not _pow2(head_dim) or head_dim // 2 < min_k:
    raise ValueError(f"head_dim={head_dim}: the Triton lowering needs a power of two with "
                     f"head_dim / 2 >= {min_k} for {np.dtype(dtype).name} dots")
  if not _pow2(block_k) or block_k < min_k:
    raise ValueError(f"{block_k} keys per step: the Triton lowering needs a power of two "
                     f">= {min_k}; raise pages_per_block")
