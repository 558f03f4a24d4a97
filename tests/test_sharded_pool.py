"""The page pool sharded over `data` on 4 CPU devices (in a child process, since this one
already started jax with one device): the engine and every round method give the one-device
greedy outputs token for token; with a fixed pool per device more agents fit as shards are
added; an agent too big for one shard fails with OutOfPages naming the shard, leaks nothing,
and the session runs the next round."""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

CHILD = r"""
import dataclasses, json, sys
import jax, numpy as np
from tokendance_jax import engine, model, sharding
from tokendance_jax.config import TINY, CacheConfig
from tokendance_jax.paging import OutOfPages
from tokendance_jax.rounds import AgentPrompt, ReusePolicy, Round, Segment
from tokendance_jax.sampling import SamplingParams
from tokendance_jax.session import RoundSession

cfg = dataclasses.replace(TINY, eos_ids=())  # no early stop
params = model.init_params(cfg, jax.random.PRNGKey(0))
rng = np.random.default_rng(0)
ids = lambda n: tuple(int(t) for t in rng.integers(3, cfg.vocab_size, n))  # noqa: E731
SYSTEM = Segment(ids(40), True, "system")
PERSONAS = [Segment(ids(20 + i % 7), False, f"persona{i}") for i in range(32)]
METHODS = ["full", "prefix", "cacheblend", "epic", "tokendance"]
out = {}


def mesh_of(data):
  return None if data == 1 else sharding.make_mesh(f"data={data}", jax.devices()[:data])


def run(session, agents, rounds, max_tokens=6):
  prev, rows = None, []
  for r in range(rounds):
    prompts = []
    for i in range(agents):
      segs = [SYSTEM, PERSONAS[i]]
      seen = sorted({(i - 1) % agents, (i + 1) % agents} - {i})  # its neighbours' outputs
      segs += [Segment(tuple(prev[f"a{j}"]), True, f"out{j}") for j in seen
               if prev and prev[f"a{j}"]]
      segs.append(Segment((5, 6, 7, 8 + i % 50, 9 + r), False, "tail"))
      prompts.append(AgentPrompt(f"a{i}", segs, max_tokens=max_tokens))
    res = session.run_round(Round(prompts))
    prev = res.outputs
    rows.append({"outputs": res.outputs, "stats": res.stats})
  return rows


# 1. every method, 6 agents x 2 rounds, one device vs data=4 (same total pool)
for data in (1, 4):
  for method in METHODS:
    s = RoundSession(params, cfg, method=method, quality=False, mesh=mesh_of(data),
                     cache_cfg=CacheConfig(num_pages=256, page_size=8),
                     policy=ReusePolicy(recompute=0.3))
    out.setdefault("methods", {}).setdefault(method, {})[data] = run(s, 6, 2)
    s.close()
    out.setdefault("leaked", {})[f"{method}/{data}"] = s.allocator.num_used

# 2. capacity: 40 pages per device; the first wave of the second round of 16 agents
for data in (1, 2, 4):
  s = RoundSession(params, cfg, method="tokendance", quality=False, mesh=mesh_of(data),
                   cache_cfg=CacheConfig(num_pages=40 * data, page_size=8),
                   policy=ReusePolicy(recompute=0.3))
  rows = run(s, 16, 2, max_tokens=4)
  out.setdefault("capacity", {})[data] = rows[-1]["stats"]["wave_sizes"]
  s.close()

# 3. an agent too big for one shard (23 usable pages) though the pool holds 92
s = RoundSession(params, cfg, method="tokendance", quality=False, mesh=mesh_of(4),
                 cache_cfg=CacheConfig(num_pages=96, page_size=8))
first = run(s, 2, 1)
held = s.allocator.num_used
big = AgentPrompt("big", [SYSTEM, Segment(ids(200), False, "long")], max_tokens=4)
try:
  s.run_round(Round([big, AgentPrompt("a0", [SYSTEM, PERSONAS[0]], max_tokens=4)]))
  out["refused"] = None
except OutOfPages as e:
  out["refused"] = {"message": str(e), "shard": e.shard}
out["held_before_after"] = [held, s.allocator.num_used]
s.allocator.check_invariants()
out["next_round"] = run(s, 2, 1)[0]["outputs"]

# 4. the engine alone: continuous batching with prefix caching, one device vs data=4
prompts = [list(SYSTEM.tokens) + list(p.tokens) for p in PERSONAS[:8]]
gen = {}
for data in (1, 4):
  e = engine.Engine(params, cfg, cache_cfg=CacheConfig(num_pages=64, page_size=8),
                    mesh=mesh_of(data), prefix_caching=True, max_batch=8)
  res = e.generate(prompts, SamplingParams(max_tokens=12))
  gen[data] = {"outputs": [r.output_ids for r in res], "preemptions": e.num_preemptions,
               "cached": e.prefix.num_pages, "shards_used": sorted(
                   {e.allocator.shard_of(p) for p in e.prefix.entries.values()})}
  e.prefix.clear()
  gen[data]["leaked"] = e.allocator.num_used
out["engine"] = gen
print(json.dumps(out))
"""


def test_sharded_pool_on_four_devices():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  done = subprocess.run([sys.executable, "-c", CHILD], env=env, cwd=ROOT, capture_output=True,
                        text=True, timeout=1500)
  assert done.returncode == 0, done.stderr[-3000:]
  got = json.loads(done.stdout.strip().splitlines()[-1])

  for method, by_data in got["methods"].items():  # keys are JSON strings
    one, four = by_data["1"], by_data["4"]
    assert [r["outputs"] for r in four] == [r["outputs"] for r in one], method
    assert all(r["stats"]["pages_sharded"] and r["stats"]["pool_shards"] == 4 for r in four)
    # agents spread over the shards: every shard holds pages of the wave
    assert all(min(r["stats"]["pages_in_use_per_shard"]) > 0 for r in four), method
  assert set(got["leaked"].values()) == {0}

  waves = got["capacity"]
  fit = [waves[d][0] for d in ("1", "2", "4")]
  assert fit[0] < fit[1] < fit[2], waves  # more shards, more agents at once
  assert len(waves["1"]) > 1  # one device could not take the round in one wave

  refused = got["refused"]
  assert refused is not None and refused["shard"] in range(4)
  assert f"shard {refused['shard']}:" in refused["message"] and "'big'" in refused["message"]
  held, after = got["held_before_after"]
  assert after == held  # the refused round took nothing (only the masters stay)
  assert set(got["next_round"]) == {"a0", "a1"} and all(got["next_round"].values())

  one, four = got["engine"]["1"], got["engine"]["4"]
  assert four["outputs"] == one["outputs"] and all(len(o) == 12 for o in one["outputs"])
  assert len(four["shards_used"]) > 1  # sequences went to several shards
  assert one["leaked"] == four["leaked"] == 0
