"""Sharded rounds: mesh specs and logical rules (in process, on abstract meshes); every
method on a 4-device CPU mesh giving the one-device greedy outputs token for token, the
Pallas kernels per device, and the `round --mesh` command line (in child processes, since
this one already started jax with one device)."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from tokendance_jax import model, sharding
from tokendance_jax.config import SMOLLM2_135M, TINY, CacheConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "multihost_round.py"
METHODS = ["full", "prefix", "cacheblend", "epic", "tokendance"]
POOL = CacheConfig(num_pages=160, page_size=8)  # the example's pool


def plan_for(data: int, model_size: int, rules=sharding.DEFAULT_RULES) -> sharding.MeshPlan:
  return sharding.MeshPlan(AbstractMesh((data, model_size), sharding.MESH_AXES), rules)


def param_shapes(cfg):
  return jax.eval_shape(lambda: model.init_params(cfg, jax.random.PRNGKey(0)))


@pytest.mark.parametrize("spec,want", [("data=2", {"data": 2, "model": 1}),
                                       (" model=3 , data=1", {"data": 1, "model": 3}),
                                       ("data=2,model=2", {"data": 2, "model": 2})])
def test_parse_mesh(spec, want):
  assert sharding.parse_mesh(spec) == want


@pytest.mark.parametrize("spec,match", [("data=two", "not an integer"), ("pipe=2", "expected"),
                                        ("data=0", ">= 1"), ("data=2,data=2", "twice"),
                                        ("", "names no axis"), ("data", "expected")])
def test_bad_mesh_specs_are_refused(spec, match):
  with pytest.raises(ValueError, match=match):
    sharding.parse_mesh(spec)


def test_too_few_devices_names_the_flag():
  with pytest.raises(ValueError, match=r"needs 6 devices; 1 available.*device_count=6"):
    sharding.make_mesh("data=2,model=3")


def test_smollm2_shards_heads_over_model_3():
  plan = plan_for(2, 3)
  shard = plan.param_shardings(param_shapes(SMOLLM2_135M), SMOLLM2_135M)
  assert shard["layers"]["wq"].spec == P(None, None, "model")
  assert shard["layers"]["wk"].spec == P(None, None, "model")
  assert shard["layers"]["wo"].spec == P(None, "model", None)
  assert shard["layers"]["w_down"].spec == P(None, "model", None)
  assert shard["embed"].spec == P("model", None)
  # the pool: kv heads over model, pages over data (each data shard its own pages)
  assert plan.pages_sharded and plan.shards == 2
  assert plan.cache_sharding(SMOLLM2_135M, CacheConfig(num_pages=64)).spec == P(
      None, "model", "data", None, None)
  assert plan.token_sharding(16).spec == P("data")
  with pytest.raises(ValueError, match="do not split over 2 pool shards"):
    plan.token_sharding(1)  # batches on a sharded pool come in one slice per shard
  whole = plan.with_replicated_pool()  # the layout before sharded pools
  assert not whole.pages_sharded and whole.shards == 1
  assert whole.cache_sharding(SMOLLM2_135M, CacheConfig()).spec == P(None, "model", None, None,
                                                                       None)
  assert whole.token_sharding(1).spec == P()  # a one-row decode batch runs replicated
  assert plan_for(1, 3).shards == 1  # one data shard: nothing to split


def test_smollm2_refuses_model_2_unless_kv_heads_replicate():
  plan = plan_for(1, 2)
  with pytest.raises(ValueError, match=r"kv_heads=3 is not divisible by mesh axis 'model' of size"):
    plan.cache_sharding(SMOLLM2_135M, CacheConfig())
  with pytest.raises(ValueError, match=r"param 'w.*(kv_)?heads=[39] is not divisible"):
    plan.param_shardings(param_shapes(SMOLLM2_135M), SMOLLM2_135M)
  rules = tuple((lg, None if lg in ("heads", "kv_heads") else ax)
                for lg, ax in sharding.DEFAULT_RULES)
  replicated = plan_for(1, 2, rules)  # attention replicated, MLP and vocab still split
  shard = replicated.param_shardings(param_shapes(SMOLLM2_135M), SMOLLM2_135M)
  assert shard["layers"]["wk"].spec == P(None, None, None)
  assert shard["layers"]["w_up"].spec == P(None, None, "model")


def test_rules_refuse_collisions_and_unknown_axes():
  rules = dict(sharding.DEFAULT_RULES) | {"embed": "model"}
  with pytest.raises(ValueError, match=r"param 'embed': .*'vocab' and 'embed' both map to"):
    plan_for(1, 2, tuple(rules.items())).param_shardings(param_shapes(TINY), TINY)
  with pytest.raises(ValueError, match="the mesh has axes"):
    plan_for(1, 2, (("heads", "tensor"),))
  with pytest.raises(ValueError, match="'pages' must map to 'data'"):
    plan_for(2, 2, (("pages", "model"),))
  with pytest.raises(ValueError, match="needs 'tokens' on 'data'"):
    plan_for(2, 1, (("pages", "data"),))


def child_env(devices: int) -> dict:
  return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
              JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))


def load_example():
  """examples/multihost_round.py as a module (its rounds are the reference workload)."""
  spec = importlib.util.spec_from_file_location("multihost_round", EXAMPLE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def start_example(json_path, *args, devices: int = 4, **popen_kw) -> subprocess.Popen:
  cmd = [sys.executable, str(EXAMPLE), "--json", str(json_path), *args]
  return subprocess.Popen(cmd, env=child_env(devices), cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, **popen_kw)


def test_sharded_rounds_match_one_device_for_every_method(tmp_path):
  """data x model parallel on 4 CPU devices == one device, token for token, every method."""
  out = tmp_path / "mesh.json"
  child = start_example(out, "--mesh", "data=2,model=2", "--methods", ",".join(METHODS))
  try:  # the one-device reference, computed here meanwhile
    ref = load_example().run_methods(METHODS)
    log, _ = child.communicate(timeout=900)
  finally:
    child.kill()
  assert child.returncode == 0, log[-3000:]
  got = json.loads(out.read_text())
  assert (got["devices"], got["mesh"]) == (4, "data=2,model=2")
  page_bytes = POOL.bytes_per_page(TINY)
  for method in METHODS:
    assert got["outputs"][method] == ref["outputs"][method], method
    assert sum(len(ids) for r in ref["outputs"][method] for ids in r.values()) > 0
    for mine, one in zip(got["stats"][method], ref["stats"][method], strict=True):
      if method == "prefix":  # a cached block serves only the agents on its shard
        assert mine["computed_tokens"] >= one["computed_tokens"]
      else:
        assert mine["computed_tokens"] == one["computed_tokens"]
      # the pool is sharded over data=2: each device holds half the pages, and half of each
      # page (kv heads over model=2); a master gets a replica on each shard whose agents
      # read it, and nothing else changes
      assert mine["pages_sharded"] is True
      assert (mine["pool_shards"], mine["pages_per_shard"]) == (2, POOL.num_pages // 2)
      replicas = mine["master_replica_pages"]
      assert sum(mine["master_pages_per_shard"]) == one["master_pages"] + replicas
      if method != "prefix":
        assert mine["pages_in_use"] == one["pages_in_use"] + replicas
      if method in ("cacheblend", "epic", "tokendance"):  # 3 agents on 2 shards
        assert 0 < replicas <= one["master_pages"]
      assert mine["kv_pool_bytes_per_device"] == POOL.num_pages * page_bytes // 4
      assert sum(mine["pages_in_use_per_shard"]) >= mine["pages_in_use"]  # peaks per shard
      assert mine["kv_bytes_in_use_per_device"] == (max(mine["pages_in_use_per_shard"])
                                                    * page_bytes / 2)
      assert 0 < mine["param_bytes_per_device"] < TINY.num_params() * 4


FORWARD_CHILD = """
import copy, json, sys
import jax, numpy as np
from tokendance_jax import engine, model, sharding
from tokendance_jax.config import TINY, AttentionConfig, CacheConfig
from tokendance_jax.paging import BlockTable, PageAllocator

pool = CacheConfig(num_pages=32, page_size=8)
params = model.init_params(TINY, jax.random.PRNGKey(1))
shards = sharding.as_plan(sys.argv[1]).shards  # a pool sharded over data: tables on shards
alloc, rng, chunks = PageAllocator(pool.num_pages, shards), np.random.default_rng(0), []
for i, n in enumerate((21, 6, 13)):
  table = BlockTable(8, shard=i % shards)
  table.ensure(n + 1, alloc)
  chunks.append((table, [int(x) for x in rng.integers(3, 250, n + 1)], 0, n))
steps = [(chunks, False), ([(t, ids, n, 1) for t, ids, _, n in chunks], True)]


def one_slice(table):
  t = copy.copy(table)
  t.shard = 0
  return t


out = []
for mesh, attn in ((None, AttentionConfig(impl="reference")),  # the one-device reference
                   (sys.argv[1], AttentionConfig(impl="pallas", interpret=True))):
  eng = engine.Engine(params, TINY, cache_cfg=pool, attn=attn, mesh=mesh)
  plan, logits = eng.mesh_plan, []
  for step, decode in steps:
    if plan is None:  # the same global page ids, all in one slice
      step = [(one_slice(t), *rest) for t, *rest in step]
    batch, _, rows = engine.build_batch(step, decode=decode,
                                        shards=1 if plan is None else shards)
    fwd = jax.jit(lambda p, c, b: model.forward(p, c, b, cfg=TINY, attn=attn, decode=decode,
                                                plan=plan),
                  out_shardings=plan and (plan.replicated, plan.cache_sharding(TINY, pool)))
    if plan is None:
      lg, eng.cache = fwd(eng.params, eng.cache, batch)
    else:
      with jax.set_mesh(plan.mesh):
        lg, eng.cache = fwd(eng.params, eng.cache, eng.place(batch)[0])
    logits.append(np.asarray(lg)[rows])  # chunk order
  out.append((logits, np.asarray(eng.cache.k)))
(one, k_one), (many, k_many) = out
print(json.dumps({"logits": max(float(np.abs(a - b).max()) for a, b in zip(one, many)),
                  "cache": float(np.abs(k_one - k_many).max()),
                  "scale": float(np.abs(one[0]).max())}))
"""


def test_pallas_kernels_run_per_device():
  """Pallas kernels (interpret mode) per device under shard_map: prefill and decode logits
  and the written cache match the one-device jnp reference."""
  done = subprocess.run([sys.executable, "-c", FORWARD_CHILD, "data=2,model=2"],
                        env=child_env(4), cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  err = json.loads(done.stdout.strip().splitlines()[-1])
  assert err["scale"] > 0.1  # real logits, not zeros
  assert err["logits"] < 1e-4 * err["scale"] and err["cache"] < 1e-4


@pytest.mark.real_model
def test_round_cli_mesh_writes_the_same_outputs(tmp_path):
  """The contract: `tokendance round --mesh data=2` (and data=2,model=3) == one device."""
  base = [sys.executable, "-m", "tokendance_jax.cli", "round", "--preset", "debate", "--agents",
          "2", "--rounds", "2", "--max-tokens", "4", "--no-quality", "--num-pages", "256"]
  outputs = {}
  for mesh in (None, "data=2", "data=2,model=3"):
    path = tmp_path / f"{mesh}.json"
    cmd = base + ["--json", str(path)] + (["--mesh", mesh] if mesh else [])
    done = subprocess.run(cmd, env=child_env(6), cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(path.read_text())
    outputs[mesh] = [r["outputs"] for r in data["rounds"]]
    if mesh:
      want = ",".join(f"{a}={n}" for a, n in sharding.parse_mesh(mesh).items())
      assert all(r["stats"]["mesh"] == want for r in data["rounds"])
  assert outputs["data=2"] == outputs[None]
  assert outputs["data=2,model=3"] == outputs[None]
  assert any(ids for r in outputs[None] for ids in r.values())


def test_round_cli_refuses_bad_mesh_before_loading():
  cmd = [sys.executable, "-m", "tokendance_jax.cli", "round", "--mesh", "data=2,model=3"]
  done = subprocess.run(cmd, env=child_env(4), cwd=ROOT, capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 2
  assert "needs 6 devices; 4 available" in done.stderr and "Traceback" not in done.stderr


def test_default_engine_has_no_mesh():
  """mesh=None keeps the one-device path: the module-level jitted steps, unplaced batches."""
  from tokendance_jax.engine import Engine, _model_step

  eng = Engine(model.init_params(TINY, jax.random.PRNGKey(0)), TINY,
               cache_cfg=CacheConfig(num_pages=16, page_size=8))
  assert eng.mesh_plan is None and eng.jitted(_model_step, 1) is _model_step
  marker = object()
  assert eng.place(marker, marker) == (marker, marker)
