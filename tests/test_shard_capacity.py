"""benchmarks/shard_capacity.py: the summary from hand-made runs (in process), and the whole
benchmark on the random-weight TINY config in a child process with 4 host devices (this
process already started jax with one)."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax  # noqa: F401  (before the benchmark module: it sets XLA_FLAGS only if jax is absent)
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "shard_capacity.py"
RUN_FIELDS = {"method", "data", "agents", "max_agents", "capped", "wave_sizes", "preemptions",
              "pages_per_device", "pool_shards", "pages_per_shard", "master_pages_per_shard",
              "pages_in_use_per_shard", "kv_pool_bytes_per_device", "ratio_vs_data1",
              "ratio_bound", "outputs_equal", "outputs", "leaked_pages", "seconds"}


def load_bench():
  spec = importlib.util.spec_from_file_location("shard_capacity", SCRIPT)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def fake_run(method, data, waves, outputs=None):
  return {"method": method, "data": data, "max_agents": waves[-1][0],
          "capped": len(waves[-1]) == 1, "wave_sizes": waves,
          "outputs": outputs or [{"a0": [1, 2]}, {"a0": [3]}], "pages_per_device": 64,
          "master_pages_per_shard": [0] * data, "pages_in_use_per_shard": [0] * data,
          "seconds": 1.0}


def test_summary_ratios_caps_and_targets():
  bench = load_bench()
  runs = [fake_run("prefix", 1, [[8], [3, 3, 3, 3, 3, 1]]),
          fake_run("prefix", 4, [[16], [12, 4]]),
          fake_run("tokendance", 1, [[8], [4, 4, 4, 4]]),
          fake_run("tokendance", 4, [[16], [16]], outputs=[{"a0": [1, 2]}, {"a0": [4]}])]
  s = bench.summarize(runs, ["prefix", "tokendance"], [1, 4])
  pf4, td4 = runs[1], runs[3]
  assert pf4["ratio_vs_data1"] == 4.0 and pf4["ratio_bound"] == "exact"
  assert td4["capped"] and td4["ratio_bound"] == "lower" and td4["ratio_vs_data1"] == 4.0
  assert s["targets"]["prefix_data4_ratio_ge_3.5"]["state"] == "met"
  assert s["targets"]["tokendance_data4_ratio_ge_3.5"]["state"] == "met"  # a lower bound >= 3.5
  assert s["advantage"]["1"]["tokendance_over_prefix"] == pytest.approx(4 / 3)
  assert s["advantage"]["4"] == {"tokendance_over_prefix": 16 / 12, "capped": True}
  assert s["targets"]["advantage_data4_ge_data1"]["state"] == "undetermined (capped)"
  # one token of one agent differs on data=4: caught, and named
  assert s["outputs_equal"] == {"prefix": True, "tokendance": False}
  assert td4["outputs_check"]["first_difference"] == {"round": 1, "agent": "a0"}
  runs[0]["wave_sizes"] = [[8], [6, 2]]
  runs[0]["max_agents"] = 6
  s = bench.summarize(runs, ["prefix", "tokendance"], [1, 4])
  assert s["targets"]["prefix_data4_ratio_ge_3.5"] == {"ratio": 2.0, "bound": "exact",
                                                       "state": "missed"}
  assert "MISSED" in bench.table({"runs": runs, "workload": {}, **s})


def test_chunk_tokenizer_is_deterministic_and_in_vocab():
  tok = load_bench().ChunkTokenizer(256)
  ids = tok.encode("the same text, twice")
  assert ids == tok.encode("the same text, twice") and len(ids) == 5
  assert all(3 <= t < 256 for t in ids)


def test_tiny_benchmark_on_four_host_devices(tmp_path):
  """tokendance on one device and data=4 (4 agents, 56 pages of 16 per device; one method
  keeps the test near a minute): data=4 holds strictly more agents at once, the masters
  on every shard, the same outputs token for token, nothing leaked."""
  out = tmp_path / "cap.json"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  cmd = [sys.executable, str(SCRIPT), "--tiny", "--methods", "tokendance",
         "--data", "1,4", "--agents", "4", "--rounds", "2", "--max-tokens", "2",
         "--pages-per-device", "56", "--page-size", "16", "--json", str(out), "--no-progress"]
  done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
  assert out.with_suffix(".png").stat().st_size > 0
  res = json.loads(out.read_text())
  assert res["workload"]["devices"] == 4 and res["workload"]["data"] == [1, 4]
  assert {"runs", "advantage", "targets", "outputs_equal", "command", "library"} <= set(res)
  by = {(r["method"], r["data"]): r for r in res["runs"]}
  assert set(by) == {("tokendance", 1), ("tokendance", 4)}
  for (method, data), r in by.items():
    assert RUN_FIELDS <= set(r), RUN_FIELDS - set(r)
    assert r["pool_shards"] == data and r["pages_per_shard"] == 56
    assert len(r["pages_in_use_per_shard"]) == data == len(r["master_pages_per_shard"])
    assert r["leaked_pages"] == 0
    assert len(r["wave_sizes"]) == 2 and sum(r["wave_sizes"][-1]) == 4
    assert r["outputs_equal"], (method, data, r["outputs_check"])
    assert all(len(ids) == 2 for rnd in r["outputs"] for ids in rnd.values())
  one, four = by[("tokendance", 1)], by[("tokendance", 4)]
  assert not one["capped"], one["wave_sizes"]  # one device: the last round in waves
  assert four["max_agents"] > one["max_agents"], (one["wave_sizes"], four["wave_sizes"])
  assert four["ratio_vs_data1"] == four["max_agents"] / one["max_agents"]
  assert four["kv_pool_bytes_per_device"] == one["kv_pool_bytes_per_device"]
  assert one["master_pages_per_shard"][0] > 0 and four["master_pages_per_shard"][0] > 0
  assert res["outputs_equal"] == {"tokendance": True}
  assert "tokendance_data4_ratio_ge_3.5" in res["targets"]

