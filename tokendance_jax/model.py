"""The Llama-architecture decoder as pure functions over a params pytree.

One call processes a ragged batch: flat token ids, each with a sequence id
and a logical position. New K/V are written into the paged cache *before*
RoPE, then every layer attends through the paged kernels, which rotate keys
from positions. Layers run under `lax.scan`; the cache is carried through the
scan and updated in place (jit donates it).

Einsum letters: t tokens, d model dim, h query heads, k kv heads, e head dim,
f ffn dim, v vocab, l layers.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from tokendance_jax import kernels, sharding
from tokendance_jax.config import AttentionConfig, CacheConfig, ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Paged K/V for every layer; keys are stored un-rotated."""

  k: jax.Array  # [l, kv_heads, num_pages, page_size, e]
  v: jax.Array  # [l, kv_heads, num_pages, page_size, e]

  @property
  def num_pages(self) -> int:
    return self.k.shape[2]

  @property
  def page_size(self) -> int:
    return self.k.shape[3]

  @classmethod
  def create(cls, cfg: ModelConfig, cache_cfg: CacheConfig) -> KVCache:
    shape = (cfg.n_layers, *kernels.kv_cache_shape(
        cache_cfg.num_pages, cache_cfg.page_size, cfg.n_kv_heads, cfg.head_dim))
    dtype = jnp.dtype(cache_cfg.dtype)
    return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Batch:
  """A ragged batch of tokens from many sequences (padding has position -1).

  Reads go through block_tables / block_pos / block_len (slot i of block j
  of row s is position block_pos[s, j] + i when i < block_len[s, j]); writes
  go to slot_mapping, so a segment can start on a fresh page while positions
  stay contiguous.
  """

  tokens: jax.Array  # [t] int32
  positions: jax.Array  # [t] int32 logical position, -1 for padding
  seq_ids: jax.Array  # [t] int32 row of block_tables
  slot_mapping: jax.Array  # [t] int32 page * page_size + slot to write; -1: write nothing
  block_tables: jax.Array  # [s, pages_per_seq] int32
  block_pos: jax.Array  # [s, pages_per_seq] int32
  block_len: jax.Array  # [s, pages_per_seq] int32
  logits_index: jax.Array  # [n] int32 flat tokens whose logits are returned

  @classmethod
  def contiguous(cls, *, tokens, positions, seq_ids, block_tables, logits_index, page_size: int):
    """Host-side constructor for the default layout: block j holds positions j*page_size.."""
    positions = np.asarray(positions, np.int32)
    seq_ids = np.asarray(seq_ids, np.int32)
    tables = np.asarray(block_tables, np.int32)
    pos = np.maximum(positions, 0)
    pages = tables[seq_ids, pos // page_size]
    slots = np.where(positions >= 0, pages * page_size + pos % page_size, -1).astype(np.int32)
    width = tables.shape[1]
    block_pos = np.broadcast_to(np.arange(width, dtype=np.int32) * page_size, tables.shape)
    return cls(tokens=np.asarray(tokens, np.int32), positions=positions, seq_ids=seq_ids,
               slot_mapping=slots, block_tables=tables, block_pos=np.array(block_pos),
               block_len=np.full(tables.shape, page_size, np.int32),
               logits_index=np.asarray(logits_index, np.int32))


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32) -> dict:
  """Random weights in the layout `weights.params_from_gguf` produces."""
  d, l = cfg.d_model, cfg.n_layers
  hq, hk = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
  shapes = {
      "wq": (l, d, hq), "wk": (l, d, hk), "wv": (l, d, hk), "wo": (l, hq, d),
      "w_gate": (l, d, cfg.ffn_dim), "w_up": (l, d, cfg.ffn_dim), "w_down": (l, cfg.ffn_dim, d),
  }
  keys = jax.random.split(key, len(shapes) + 1)
  layers = {name: (jax.random.normal(k, s) / jnp.sqrt(s[1])).astype(dtype)
            for k, (name, s) in zip(keys[1:], shapes.items(), strict=True)}
  layers["attn_norm"] = jnp.ones((l, d), dtype)
  layers["mlp_norm"] = jnp.ones((l, d), dtype)
  return {
      "embed": (0.1 * jax.random.normal(keys[0], (cfg.vocab_size, d))).astype(dtype),
      "final_norm": jnp.ones((d,), dtype),
      "layers": layers,
  }


def rms_norm(x, weight, eps: float):
  """x: [t, d], weight: [d]; normalizes in float32 like the reference Llama."""
  xf = x.astype(jnp.float32)
  xf = xf * lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return weight * xf.astype(x.dtype)


def _write_kv(cache_k, cache_v, layer, k, v, batch: Batch):
  """Scatter this layer's new k, v: [t, kv_heads, e] to batch.slot_mapping (-1 dropped)."""
  page_size, num_pages = cache_k.shape[3], cache_k.shape[2]
  page = jnp.where(batch.slot_mapping >= 0, batch.slot_mapping // page_size, num_pages)
  slot = batch.slot_mapping % page_size
  heads = jnp.arange(k.shape[1])[:, None]
  index = (layer, heads, page[None, :], slot[None, :])
  cache_k = cache_k.at[index].set(k.transpose(1, 0, 2).astype(cache_k.dtype), mode="drop")
  cache_v = cache_v.at[index].set(v.transpose(1, 0, 2).astype(cache_v.dtype), mode="drop")
  return cache_k, cache_v


def attention_fn(attn: AttentionConfig, decode: bool):
  """The paged attention function `attn` selects (decode has no chunked path: the reference)."""
  if decode:  # one token per sequence, token i belongs to row i
    return (kernels.paged_decode_attention if attn.impl == "pallas"
            else kernels.paged_decode_attention_reference)
  return {"pallas": kernels.ragged_paged_attention,
          "chunked": kernels.ragged_paged_attention_chunked,
          "reference": kernels.ragged_paged_attention_reference}[attn.impl]


def attention_args(q, cache_k, cache_v, layer, batch: Batch, cfg: ModelConfig,
                   attn: AttentionConfig, decode: bool) -> tuple[tuple, dict]:
  """(positional, keyword) arguments of `attention_fn(attn, decode)` for a batch."""
  if attn.tuning is not None:  # per-device kernel tuning (kernels.tuning)
    block_sizes = attn.tuning.block_sizes(decode=decode, group=cfg.q_per_kv)
  else:
    block_sizes = kernels.BlockSizes(block_q=attn.block_q, pages_per_block=attn.pages_per_block)
  common = dict(layer=layer, rope_theta=cfg.rope_theta, block_sizes=block_sizes,
                block_pos=batch.block_pos, block_len=batch.block_len)
  if attn.impl == "pallas":
    common["interpret"] = attn.interpret
  args = (q, cache_k, cache_v, batch.block_tables, batch.positions)
  if not decode:
    args += (batch.seq_ids,)
  return args, common


def _attention(q, cache_k, cache_v, layer, batch: Batch, cfg: ModelConfig,
               attn: AttentionConfig, decode: bool):
  """q: [t, h, e] un-rotated -> [t, h, e] via the paged kernels (or their references)."""
  fn = attention_fn(attn, decode)
  args, common = attention_args(q, cache_k, cache_v, layer, batch, cfg, attn, decode)
  plan = sharding.active_plan()  # set while a step runs on a mesh
  if plan is not None:
    return sharding.shard_attention(plan, fn, args, common, decode=decode)
  return fn(*args, **common)


def _layer(x, lp, cache_k, cache_v, layer, batch, cfg, attn, decode):
  """One decoder block: x [t, d] -> [t, d]; returns the updated cache too."""
  t = x.shape[0]
  with jax.named_scope("attention"):
    h = rms_norm(x, lp["attn_norm"], cfg.rms_eps)
    q = (h @ lp["wq"]).reshape(t, cfg.n_heads, cfg.head_dim)
    k = (h @ lp["wk"]).reshape(t, cfg.n_kv_heads, cfg.head_dim)
    v = (h @ lp["wv"]).reshape(t, cfg.n_kv_heads, cfg.head_dim)
    cache_k, cache_v = _write_kv(cache_k, cache_v, layer, k, v, batch)
    o = _attention(q, cache_k, cache_v, layer, batch, cfg, attn, decode)
    x = x + o.reshape(t, -1).astype(x.dtype) @ lp["wo"]
  with jax.named_scope("mlp"):
    h = rms_norm(x, lp["mlp_norm"], cfg.rms_eps)
    x = x + (jax.nn.silu(h @ lp["w_gate"]) * (h @ lp["w_up"])) @ lp["w_down"]
  return x, cache_k, cache_v


def forward(params: dict, cache: KVCache, batch: Batch, *, cfg: ModelConfig,
            attn: AttentionConfig = AttentionConfig(), decode: bool = False):
  """Run the model over a ragged batch.

  Returns (logits [n, vocab] float32 at batch.logits_index, updated cache).
  With decode=True each sequence contributes exactly one token, token i
  belonging to block-table row i.
  """
  x = params["embed"][batch.tokens]  # [t, d]

  def body(carry, xs):
    x, ck, cv = carry
    lp, layer = xs
    x, ck, cv = _layer(x, lp, ck, cv, layer, batch, cfg, attn, decode)
    return (x, ck, cv), None

  xs = (params["layers"], jnp.arange(cfg.n_layers, dtype=jnp.int32))
  (x, ck, cv), _ = lax.scan(body, (x, cache.k, cache.v), xs)
  with jax.named_scope("logits"):
    h = rms_norm(x[batch.logits_index], params["final_norm"], cfg.rms_eps)
    logits = jnp.einsum("nd,vd->nv", h.astype(jnp.float32), params["embed"].astype(jnp.float32))
  return logits, KVCache(k=ck, v=cv)


forward_jit = jax.jit(forward, static_argnames=("cfg", "attn", "decode"), donate_argnames=("cache",))


@functools.partial(jax.jit, static_argnames=("cfg",))
def dense_forward(params: dict, tokens: jax.Array, *, cfg: ModelConfig):
  """Unpaged causal forward of one sequence, tokens [t] -> logits [t, vocab].

  A second, independent path through the same weights (RoPE on both q and
  k up front, a plain causal softmax), used to check the paged path.
  """
  t = tokens.shape[0]
  pos = jnp.arange(t)
  mask = pos[None, :] <= pos[:, None]
  x = params["embed"][tokens]

  def body(x, lp):
    h = rms_norm(x, lp["attn_norm"], cfg.rms_eps)
    q = kernels.apply_rope((h @ lp["wq"]).reshape(t, cfg.n_heads, cfg.head_dim), pos, cfg.rope_theta)
    k = kernels.apply_rope((h @ lp["wk"]).reshape(t, cfg.n_kv_heads, cfg.head_dim), pos,
                           cfg.rope_theta)
    v = (h @ lp["wv"]).reshape(t, cfg.n_kv_heads, cfg.head_dim)
    k = jnp.repeat(k, cfg.q_per_kv, axis=1)
    v = jnp.repeat(v, cfg.q_per_kv, axis=1)
    s = jnp.einsum("qhe,khe->hqk", q, k) / jnp.sqrt(cfg.head_dim).astype(q.dtype)
    p = jax.nn.softmax(jnp.where(mask, s.astype(jnp.float32), -1e30), axis=-1)
    o = jnp.einsum("hqk,khe->qhe", p.astype(v.dtype), v).reshape(t, -1)
    x = x + o @ lp["wo"]
    h = rms_norm(x, lp["mlp_norm"], cfg.rms_eps)
    return x + (jax.nn.silu(h @ lp["w_gate"]) * (h @ lp["w_up"])) @ lp["w_down"], None

  x, _ = lax.scan(body, x, params["layers"])
  h = rms_norm(x, params["final_norm"], cfg.rms_eps)
  return jnp.einsum("td,vd->tv", h.astype(jnp.float32), params["embed"].astype(jnp.float32))
