"""Pallas attention kernels over a paged, pre-RoPE KV cache, with jnp references.

Installed as `tokendance_jax.kernels`. Kernels never import the package.
"""

from . import lowering, tuning
from .attention_body import DEFAULT_MASK_VALUE, BlockSizes
from .paged_decode_attention import (
    combine_splits,
    kv_cache_shape,
    paged_decode_attention,
    paged_decode_attention_reference,
    split_count,
)
from .ragged_paged_attention import (
    ragged_paged_attention,
    ragged_paged_attention_chunked,
    ragged_paged_attention_reference,
    tile_plan,
    tile_tokens,
)
from .rope import apply_rope, cos_sin_table, inv_freq

__all__ = [
    "DEFAULT_MASK_VALUE",
    "BlockSizes",
    "apply_rope",
    "combine_splits",
    "cos_sin_table",
    "inv_freq",
    "kv_cache_shape",
    "lowering",
    "paged_decode_attention",
    "paged_decode_attention_reference",
    "ragged_paged_attention",
    "ragged_paged_attention_chunked",
    "ragged_paged_attention_reference",
    "split_count",
    "tile_plan",
    "tile_tokens",
    "tuning",
]
