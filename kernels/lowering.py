"""The one place the lowering of the Pallas kernels is chosen, and what each one requires.

Two lowerings, one per accelerator: "triton" (GPU, and the CPU interpret
mode the tests have always used) and "mosaic_tpu" (TPU: the kernels of
`tpu_attention`). An entry point's `lowering=None` picks by the default
backend (`resolve_lowering`); nothing else in kernels/ names a backend.

GPU. Today that is Pallas' Triton lowering (`jax.experimental.pallas.triton`),
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
LOWERINGS = ("triton", "mosaic_tpu")


def resolve_lowering(lowering: str | None) -> str:
  """The lowering an entry point runs: `lowering`, or by the default backend when None."""
  if lowering is None:
    import jax

    return "mosaic_tpu" if jax.default_backend() == "tpu" else LOWERING
  if lowering not in LOWERINGS:
    raise ValueError(f"lowering={lowering!r}; expected one of {', '.join(LOWERINGS)}")
  return lowering


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


# ---------------------------------------------------------------------------
# TPU (Mosaic). The kernels' VMEM buffers and query tiles follow the (8, 128)
# vector-register tile: 8 sublanes of 32-bit values, 16 of bf16 (packed).

TPU_DTYPES = ("float32", "bfloat16")


def tpu_sublanes(dtype) -> int:
  """Rows of one (sublane) tile of `dtype`: 8 for 32-bit, 16 for bf16."""
  import numpy as np

  return 8 * (4 // np.dtype(dtype).itemsize)


def check_tpu_shapes(*, head_dim: int, page_size: int, dtype) -> None:
  """Raise ValueError where the TPU kernels' layout does not hold (checked in interpret mode too).

  A page is DMA'd into rows of a VMEM buffer, so it must span whole sublane
  tiles; head_dim is rotated in two halves, and wider than 128 it must fill
  whole 128-lane tiles.
  """
  import numpy as np

  name = np.dtype(dtype).name
  if name not in TPU_DTYPES:
    raise ValueError(f"dtype {name}: the TPU kernels take {' or '.join(TPU_DTYPES)} pools")
  sub = tpu_sublanes(dtype)
  if page_size % sub:
    raise ValueError(f"page_size={page_size}: the TPU kernels need a multiple of {sub} tokens "
                     f"per page for {name} (one sublane tile)")
  if head_dim % 2 or (head_dim > 128 and head_dim % 128):
    raise ValueError(f"head_dim={head_dim}: the TPU kernels need an even head_dim, and a "
                     "multiple of 128 above 128")


def tpu_interpret(interpret):
  """`interpret` for a TPU pallas_call: True -> TPU interpret mode with NaN-filled
  uninitialized memory and out-of-bounds reads raised; InterpretParams pass through."""
  if interpret is True:
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.InterpretParams(uninitialized_memory="nan", out_of_bounds_reads="raise")
  return interpret or False
