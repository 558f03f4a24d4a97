"""The KV Collector's device steps: batched deviation check, selection, page copies.

For a group of agents (all agents of a round for the collective method, one
agent at a time for per-request baselines) these run as single jit-compiled
calls over one ragged batch:

1. `check_deviation`: layers 0..check_layer over each prompt's tokens past its
   exact head (leading shared segments whose masters were computed after
   exactly the tokens before them; their layers are copied into the scratch
   cache once by `copy_layers`); the deviation of each reused token is the
   squared distance between its fresh key and its reused (master) key at the
   check layer. Keys are stored before RoPE, so no position correction is
   needed. `deviation_profile` gives the relative deviation the threshold
   mode (`ReusePolicy.tau`) compares with tau.
2. `select_tokens`: per-agent top-k of deviation (token level) or of summed
   deviation per page (block level), on device.
3. `copy_pages`: copy-on-write of master pages into an agent's own pages.

The recompute itself is one `Engine.prefill` over the selected tokens.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from tokendance_jax import model, sharding
from tokendance_jax.config import AttentionConfig, ModelConfig


def _first_layers(params: dict, n: int) -> dict:
  return {**params, "layers": jax.tree.map(lambda x: x[:n], params["layers"])}


def _gather_keys(k_layer, slots):
  """k_layer [kv_heads, pages, page_size, e], slots [t] -> [t, kv_heads, e] (slot < 0 -> 0)."""
  page_size = k_layer.shape[2]
  s = jnp.maximum(slots, 0)
  keys = k_layer[:, s // page_size, s % page_size]  # [kv_heads, t, e]
  return jnp.where((slots >= 0)[None, :, None], keys, 0).transpose(1, 0, 2).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("cfg", "attn", "check_layer", "plan"),
                   donate_argnames=("scratch",))
def check_deviation(params, scratch: model.KVCache, reused_k, batch: model.Batch, reuse_slots, *,
                    cfg: ModelConfig, attn: AttentionConfig, check_layer: int, plan=None):
  """Key deviation of every token at check_layer.

  Args:
    params: full params; only layers 0..check_layer run.
    scratch: a cache of check_layer + 1 layers; batch writes every prompt token there.
    reused_k: [kv_heads, pages, page_size, e] the main cache's keys at check_layer.
    batch: every prompt token of the group, laid out in the scratch cache.
    reuse_slots: [t] flat slot of each token's reused key in the main cache; -1 = not reused.

  Returns:
    (deviation [t] float32, 0 where not reused or numerically exact; the squared norm
    [t] float32 of each token's reused key, 0 where not reused; the scratch cache).
    A deviation below 1e-8 of the key's squared norm (relative L2 error 1e-4)
    counts as 0, so float noise (another batch shape, a sharded sum) cannot
    reorder ties between exact tokens (e.g. a system prompt at position 0).
  """
  n = check_layer + 1
  sub_cfg = dataclasses.replace(cfg, n_layers=n)
  _, scratch = model.forward(_first_layers(params, n), scratch, batch, cfg=sub_cfg, attn=attn,
                             plan=plan)
  fresh = _gather_keys(scratch.k[check_layer], batch.slot_mapping)
  reused = _gather_keys(reused_k, reuse_slots)
  dev = jnp.sum(jnp.square(fresh - reused), axis=(1, 2))
  norm = jnp.where(reuse_slots >= 0, jnp.sum(jnp.square(reused), axis=(1, 2)), 0.0)
  exact = dev <= 1e-8 * norm
  return jnp.where((reuse_slots >= 0) & ~exact, dev, 0.0), norm, scratch


@functools.partial(jax.jit, static_argnames=("num_agents", "by_block"))
def select_tokens(deviation, norm, agent, block, candidate, budget, tau, *, num_agents: int,
                  by_block: bool):
  """Per-agent top-`budget` of candidate tokens by deviation -> mask [t] bool.

  Args:
    deviation: [t] float32 squared key deviation (`check_deviation`).
    norm: [t] float32 squared norm of each token's reused key.
    agent: [t] int32 agent of each token (padding: any, with candidate False).
    block: [t] int32 global id of the page block holding each token.
    candidate: [t] bool tokens eligible for selection (reused shared tokens).
    budget: [num_agents] int32 tokens to recompute per agent (the cap).
    tau: [] float32; < 0 takes every candidate up to the budget (fixed fraction). >= 0
      takes only tokens (blocks: summed over the block) whose deviation exceeds tau
      relative to the key norm, ||dk|| > tau ||k||, i.e. deviation > tau^2 norm.
    by_block: rank whole blocks by summed deviation and take blocks until the
      agent's budget is covered (block-aligned recompute, page-sparse mirrors).
  """
  t = deviation.shape[0]

  def over(dev, nrm):
    return (tau < 0) | (dev > jnp.square(tau) * nrm)

  if by_block:
    dev_b = jax.ops.segment_sum(jnp.where(candidate, deviation, 0.0), block, num_segments=t)
    norm_b = jax.ops.segment_sum(jnp.where(candidate, norm, 0.0), block, num_segments=t)
    count_b = jax.ops.segment_sum(candidate.astype(jnp.int32), block, num_segments=t)
    agent_b = jax.ops.segment_max(jnp.where(candidate, agent, -1), block, num_segments=t)
    eligible_b = (count_b > 0) & over(dev_b, norm_b)
    chosen_b = _rank_select(dev_b, agent_b, count_b, eligible_b, budget, num_agents)
    return candidate & chosen_b[block]
  eligible = candidate & over(deviation, norm)
  return _rank_select(deviation, agent, jnp.ones_like(agent), eligible, budget, num_agents)


def deviation_profile(deviation, norm, candidate, block=None) -> dict:
  """Quantiles of the relative key deviation ||dk|| / ||k|| the threshold mode compares with
  tau: per candidate token, or per page (summed over its candidate tokens) when `block` [t]
  is given. Host-side numpy over `select_tokens`' inputs; for choosing tau.
  """
  dev = np.where(candidate, deviation, 0.0).astype(np.float64)
  nrm = np.where(candidate, norm, 0.0).astype(np.float64)
  if block is not None:
    dev, nrm = np.bincount(block, dev), np.bincount(block, nrm)
    keep = np.bincount(block, candidate.astype(np.int64)) > 0
  else:
    keep = np.asarray(candidate, bool)
  rel = np.sqrt(dev[keep] / np.maximum(nrm[keep], 1e-30))
  if rel.size == 0:
    return {"items": 0}
  q = np.quantile(rel, [0.5, 0.9, 0.99])
  return {"items": int(rel.size), "exact": int(np.sum(rel == 0)), "p50": float(q[0]),
          "p90": float(q[1]), "p99": float(q[2]), "max": float(rel.max())}


def _rank_select(score, owner, weight, eligible, budget, num_agents):
  """Within each owner, take items by descending score while the weight taken < budget."""
  owner_c = jnp.where(eligible, owner, num_agents)  # ineligible items sort last
  order = jnp.lexsort((-jnp.where(eligible, score, -jnp.inf), owner_c))
  w = jnp.where(eligible, weight, 0)[order]
  own = owner_c[order]
  cum = jnp.cumsum(w)
  start = jax.ops.segment_sum(w, own, num_segments=num_agents + 1)
  before_owner = jnp.cumsum(start) - start  # weight of all earlier owners
  taken_before = cum - w - before_owner[own]
  cap = jnp.concatenate([budget, jnp.zeros((1,), budget.dtype)])[own]
  chosen = eligible[order] & (taken_before < cap)
  return jnp.zeros_like(eligible).at[order].set(chosen)


@functools.partial(jax.jit, donate_argnames=("scratch",))
def copy_layers(scratch: model.KVCache, cache: model.KVCache, src, dst) -> model.KVCache:
  """scratch pages dst[i] <- cache pages src[i] in the scratch's layers (the first of the
  cache's); dst out of range is skipped (padding)."""
  n = scratch.k.shape[0]
  return model.KVCache(
      k=scratch.k.at[:, :, dst].set(cache.k[:n, :, src].astype(scratch.k.dtype), mode="drop"),
      v=scratch.v.at[:, :, dst].set(cache.v[:n, :, src].astype(scratch.v.dtype), mode="drop"))


@functools.partial(jax.jit, donate_argnames=("cache",))
def copy_pages(cache: model.KVCache, src, dst) -> model.KVCache:
  """cache pages dst[i] <- src[i] in every layer; dst out of range is skipped (padding)."""
  return model.KVCache(k=cache.k.at[:, :, dst].set(cache.k[:, :, src], mode="drop"),
                       v=cache.v.at[:, :, dst].set(cache.v[:, :, src], mode="drop"))


@functools.partial(jax.jit, static_argnames=("plan",), donate_argnames=("cache",))
def copy_pages_sharded(cache: model.KVCache, src, dst, *, plan) -> model.KVCache:
  """`copy_pages` on a pool sharded over `data`, between shards too
  (`sharding.shard_copy_pages`)."""
  return model.KVCache(*sharding.shard_copy_pages(plan, cache.k, cache.v, src, dst))
