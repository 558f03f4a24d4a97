"""Model shapes the GPU benchmarks run at, with random weights (no model wheel needed).

`smollm2` is the real model's shape (tokendance_jax.config.SMOLLM2_135M);
`qwen7b` is Qwen2.5-7B-Instruct's published shape (28 query / 4 KV heads of
128, 28 layers, d_model 3584, FFN 18944, vocab 152064, RoPE theta 1e6,
untied embeddings: `init_params` ties them, which changes no matmul shape);
`tiny` is a small config for CPU smoke runs (`--quick`). Random weights of
the real shapes serve for timing; quality stays a CPU measurement on the
real SmolLM2 weights.
"""

from __future__ import annotations

import dataclasses

from tokendance_jax.config import SMOLLM2_135M, ModelConfig

QWEN25_7B = ModelConfig(
    vocab_size=152064, d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4, head_dim=128,
    ffn_dim=18944, rope_theta=1e6, rms_eps=1e-6, max_seq_len=32768, tie_embeddings=False,
    bos_id=151643, eos_ids=(151645, 151643))

# head_dim 64 so the compiled kernels could run it too (Triton needs head_dim / 2 >= 16).
TINY_GPU = ModelConfig(
    vocab_size=512, d_model=128, n_layers=2, n_heads=6, n_kv_heads=2, head_dim=64, ffn_dim=256,
    rope_theta=1e4, max_seq_len=4096, bos_id=1, eos_ids=(2,))

MODELS = {"smollm2": SMOLLM2_135M, "qwen7b": QWEN25_7B, "tiny": TINY_GPU}


def model(name: str) -> ModelConfig:
  if name not in MODELS:
    raise ValueError(f"unknown model shape {name!r}; expected one of {', '.join(MODELS)}")
  return MODELS[name]


@dataclasses.dataclass(frozen=True)
class AttentionShape:
  """The attention geometry kernel_bench times at."""

  name: str
  n_heads: int
  kv_heads: int
  head_dim: int
  rope_theta: float


def attention_shape(name: str) -> AttentionShape:
  cfg = model(name)
  return AttentionShape(name, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.rope_theta)


# Vendor datasheet HBM bandwidth (GB/s) per device kind, to state decode bandwidth as a
# fraction of peak; a datasheet figure, not a measurement.
HBM_PEAK_GBPS = {"H100": 3350.0, "H200": 4800.0}


def hbm_peak(device_kind: str) -> float | None:
  for key, gbps in HBM_PEAK_GBPS.items():
    if key.lower() in device_kind.lower():
      return gbps
  return None
