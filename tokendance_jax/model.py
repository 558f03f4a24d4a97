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

import functools

import jax
import jax.numpy as jnp
from jax import lax

from tokendance_jax import kernels, sharding
from tokendance_jax.config import AttentionConfig, ModelConfig
from tokendance_jax.kvcache import Batch, KVCache

__all__ = ["Batch", "KVCache", "dense_forward", "forward", "forward_jit", "init_params"]


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


def _write_kv(cache_k, cache_v, layer, k, v, slot_mapping):
  """Scatter this layer's new k, v: [t, kv_heads, e] to slot_mapping [t] (-1 dropped)."""
  page_size, num_pages = cache_k.shape[3], cache_k.shape[2]
  page = jnp.where(slot_mapping >= 0, slot_mapping // page_size, num_pages)
  slot = slot_mapping % page_size
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
    common["lowering"] = attn.lowering
  args = (q, cache_k, cache_v, batch.block_tables, batch.positions)
  if not decode:
    args += (batch.seq_ids,)
  return args, common


def _attention(q, cache_k, cache_v, layer, batch: Batch, cfg: ModelConfig,
               attn: AttentionConfig, decode: bool, plan: sharding.MeshPlan | None):
  """q: [t, h, e] un-rotated -> [t, h, e] via the paged kernels (or their references)."""
  fn = attention_fn(attn, decode)
  args, common = attention_args(q, cache_k, cache_v, layer, batch, cfg, attn, decode)
  if plan is not None:  # on a mesh: attention per device
    return sharding.shard_attention(plan, fn, args, common, decode=decode)
  return fn(*args, **common)


def _layer(x, lp, cache_k, cache_v, layer, batch, cfg, attn, decode, plan):
  """One decoder block: x [t, d] -> [t, d]; returns the updated cache too."""
  t = x.shape[0]
  with jax.named_scope("attention"):
    h = rms_norm(x, lp["attn_norm"], cfg.rms_eps)
    q = (h @ lp["wq"]).reshape(t, cfg.n_heads, cfg.head_dim)
    k = (h @ lp["wk"]).reshape(t, cfg.n_kv_heads, cfg.head_dim)
    v = (h @ lp["wv"]).reshape(t, cfg.n_kv_heads, cfg.head_dim)
    if plan is not None and plan.pages_sharded:  # each device writes its own pages
      cache_k, cache_v = sharding.shard_write(plan, _write_kv, cache_k, cache_v, layer, k, v,
                                              batch.slot_mapping)
    else:
      cache_k, cache_v = _write_kv(cache_k, cache_v, layer, k, v, batch.slot_mapping)
    o = _attention(q, cache_k, cache_v, layer, batch, cfg, attn, decode, plan)
    x = x + o.reshape(t, -1).astype(x.dtype) @ lp["wo"]
  with jax.named_scope("mlp"):
    h = rms_norm(x, lp["mlp_norm"], cfg.rms_eps)
    x = x + (jax.nn.silu(h @ lp["w_gate"]) * (h @ lp["w_up"])) @ lp["w_down"]
  return x, cache_k, cache_v


def forward(params: dict, cache: KVCache, batch: Batch, *, cfg: ModelConfig,
            attn: AttentionConfig = AttentionConfig(), decode: bool = False,
            plan: sharding.MeshPlan | None = None):
  """Run the model over a ragged batch (on `plan`'s mesh when given: see `sharding`).

  Returns (logits [n, vocab] float32 at batch.logits_index, updated cache).
  With decode=True each sequence contributes exactly one token, token i
  belonging to block-table row i.
  """
  x = params["embed"][batch.tokens]  # [t, d]

  def body(carry, xs):
    x, ck, cv = carry
    lp, layer = xs
    x, ck, cv = _layer(x, lp, ck, cv, layer, batch, cfg, attn, decode, plan)
    return (x, ck, cv), None

  xs = (params["layers"], jnp.arange(cfg.n_layers, dtype=jnp.int32))
  (x, ck, cv), _ = lax.scan(body, (x, cache.k, cache.v), xs)
  with jax.named_scope("logits"):
    h = rms_norm(x[batch.logits_index], params["final_norm"], cfg.rms_eps)
    logits = jnp.einsum("nd,vd->nv", h.astype(jnp.float32), params["embed"].astype(jnp.float32))
  return logits, KVCache(k=ck, v=cv)


forward_jit = jax.jit(forward, static_argnames=("cfg", "attn", "decode", "plan"),
                      donate_argnames=("cache",))


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
