"""A round's counters: what the stages add up, and the token and device totals."""

from __future__ import annotations

from tokendance_jax import sharding
from tokendance_jax.config import ModelConfig
from tokendance_jax.layout import AgentState

__all__ = ["device_stats", "new_stats", "token_stats"]


def new_stats() -> dict:
  """A round's prefill counters, all zero."""
  return dict(master_prefill_seconds=0.0, check_seconds=0.0, copy_seconds=0.0,
              recompute_seconds=0.0, pages_copied=0, check_flops=0.0, master_tokens=0,
              checked_tokens=0)


def token_stats(agents: list[AgentState], cfg: ModelConfig) -> dict:
  """Tokens computed in the round, in all and per agent (reused shared tokens recomputed,
  out of the agent's shared tokens)."""
  prompt = sum(a.num_prompt for a in agents)
  done = [a.recompute for a in agents if a.recompute is not None]
  recomputed = sum(len(r) for r in done)
  shared = {a.agent_id: int(a.shared_mask.sum()) for a in agents}
  shared_recomputed = {a.agent_id: int(a.shared_mask[a.recompute].sum()) for a in agents
                       if a.recompute is not None}
  return {"prompt_tokens": prompt, "computed_tokens": recomputed,
          "computed_fraction": recomputed / max(prompt, 1),
          "computed_flops": float(sum(cfg.prefill_flops(r) for r in done)),
          "shared_tokens_per_agent": shared,
          "shared_recomputed_per_agent": shared_recomputed}


def device_stats(engine, fp, page_bytes: int, masters=()) -> dict:
  """Per-device memory under a mesh, from a round's `diffstore.Footprint`. On a sharded pool
  (`pages_sharded`) each `data` shard holds its own pages: in-use bytes per device are the
  fullest shard's at the round's peak; a shard holds a replica of each master its agents
  read (`master_pages_per_shard`; `master_replica_pages` counts the pages beyond each
  master's first copy). On a replicated pool every device holds its kv-head share of
  every page."""
  plan, alloc = engine.mesh_plan, engine.allocator
  heads = plan.kv_fraction_per_device() * plan.shards  # kv-head share of one page
  in_use = max(fp.pages_in_use_per_shard) if plan.pages_sharded else fp.pages_in_use
  return {"mesh": sharding.describe(plan.mesh), "devices": plan.mesh.size,
          "pages_sharded": plan.pages_sharded, "pool_shards": alloc.shards,
          "pages_per_shard": alloc.pages_per_shard,
          "master_pages_per_shard": [sum(len(m.replicas.get(d, ())) for m in masters)
                                     for d in range(alloc.shards)],
          "master_replica_pages": sum(len(m.pages) - m.num_blocks for m in masters),
          "kv_bytes_in_use_per_device": in_use * page_bytes * heads,
          "kv_pool_bytes_per_device": plan.bytes_per_device(engine.cache),
          "param_bytes_per_device": plan.bytes_per_device(engine.params)}
