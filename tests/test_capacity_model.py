"""benchmarks/capacity_model.py: measured pages split into shared (once per shard) and
per-agent pages, projected onto a page pool sharded along the `data` mesh axis.

Every expected number here is worked out by hand from the tiny inputs (comments show the
arithmetic), not read back from the code.
"""

import importlib.util
import json
import pathlib
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
KIB = 1024


@pytest.fixture(scope="module")
def cm():
  spec = importlib.util.spec_from_file_location("capacity_model",
                                                REPO / "benchmarks" / "capacity_model.py")
  mod = importlib.util.module_from_spec(spec)
  sys.modules["capacity_model"] = mod  # dataclasses look their module up there
  spec.loader.exec_module(mod)
  return mod


def point(method, agents, pages, shared, *, computed=1.0, recompute=0.1, page_bytes=KIB):
  """A storage point: 1000 prompt tokens per agent, 20% of them private."""
  return dict(kind="run", method=method, agents=agents, kv_bytes_per_agent=pages * page_bytes,
              shared_kv_bytes_per_agent=shared * page_bytes, bytes_per_page=page_bytes,
              prompt_tokens_per_agent=1000.0, private_share=0.2, computed_fraction=computed,
              recompute=recompute)


def storage(points):
  return {"experiment": "storage", "model": "SmolLM2-135M-Instruct", "preset": "agent_society",
          "config": {"page_size": 16, "recompute": 0.1, "select": "block"}, "points": points}


# 4 agents, page size 16, 1000 prompt tokens per agent of which 800 shared:
#  tokendance: 30 pages per agent, 12 of them shared region; recompute 0.1 -> 80 tokens
#    -> 5 mirror pages per agent; masters = 4 x (12 - 5) = 28; own = 30 - 28/4 = 23.
#  prefix: 60 pages per agent; computed 0.84 -> 160 hit tokens -> 10 common-prefix pages;
#    own = 60 - 10/4 = 57.5.
#  full: 70 pages per agent, nothing shared.
TINY = [point("tokendance", 4, 30, 12), point("prefix", 4, 60, 45, computed=0.84),
        point("full", 4, 70, 0)]


def test_storage_points_are_split_into_shared_and_per_agent_pages(tmp_path, cm):
  path = tmp_path / "s.json"
  path.write_text(json.dumps(storage(TINY + [point("prefix", 2, 99, 9),
                                             point("tokendance", 2, 99, 9)])))
  m = cm.measured_pages(path)
  assert m["agents"] == 4  # the largest count with both prefix and tokendance
  td, pre, full = (m["methods"][k] for k in ("tokendance", "prefix", "full"))
  assert td["pages_per_agent"] == 30
  assert td["fixed_pages"] == pytest.approx(28)
  assert td["own_pages_per_agent"] == pytest.approx(23)
  assert pre["fixed_pages"] == pytest.approx(10)
  assert pre["own_pages_per_agent"] == pytest.approx(57.5)
  assert full["fixed_pages"] == 0 and full["own_pages_per_agent"] == 70


def test_round_bench_mirror_pages_are_used_when_measured(tmp_path, cm):
  def run(method, pages, shared, stats):
    last = {"kv_bytes_per_agent": pages * KIB, "shared_kv_bytes_per_agent": shared * KIB,
            "private_share": 0.2,
            "stats": {"prompt_tokens": 4000, "computed_fraction": 0.84, **stats}}
    return {"method": method, "bytes_per_page": KIB, "config": {"recompute": 0.1},
            "rounds": [dict(last, kv_bytes_per_agent=1), last]}  # the last round counts
  path = tmp_path / "r.json"
  path.write_text(json.dumps({
      "model": "m", "preset": "agent_society", "agents": 4, "page_size": 16,
      "runs": [run("tokendance", 30, 12, {"mirror_pages": 24}),  # 6 per agent, measured
               run("prefix", 60, 45, {"mirror_pages": 0})]}))
  m = cm.measured_pages(path)["methods"]
  # masters = 4 x (12 - 6) = 24 (not the 28 the 5-page estimate would give); own = 30 - 6
  assert m["tokendance"]["fixed_pages"] == pytest.approx(24)
  assert m["tokendance"]["own_pages_per_agent"] == pytest.approx(24)
  assert m["tokendance"]["split"].startswith("measured")
  assert m["prefix"]["fixed_pages"] == pytest.approx(10)  # 0.16 x 1000 / 16


@pytest.mark.parametrize("pages,expected", [
    (100, 3),   # (100 - 28) / 23 = 3.13: masters once, not 28 per agent ((100) / 51 = 1)
    (97, 3),    # 69 / 23 = 3 exactly
    (96, 2),    # 68 / 23 = 2.96
    (51, 1),    # 23 / 23: room for one agent beside the masters
    (50, 0),
    (28, 0),    # the masters alone fill the shard
    (10, 0),    # the masters do not fit
])
def test_agents_per_shard_pays_the_masters_once(cm, pages, expected):
  assert cm.agents_per_shard(pages, fixed=28, own=23) == expected


def test_sharding_multiplies_agents_and_replicates_masters_once_per_shard(cm):
  r = cm.sharded(100, fixed=28, own=23, data=4, page_kib=2.0, tp=2)
  assert r["agents_per_shard"] == 3
  assert r["max_agents"] == 12                 # 4 shards x 3
  assert r["pooled_max_agents"] == 16          # (400 - 28) / 23 = 16.2
  assert r["lost_vs_pooled"] == 4
  assert r["replicated_fixed_pages"] == 112    # 28 x 4: one replica per shard
  assert r["extra_replica_pages"] == 84        # 28 x 3 more than one pool
  assert r["extra_replica_agents"] == pytest.approx(84 / 23)
  assert r["replica_gib_per_chip"] == pytest.approx(28 * 2 / 2**20)
  assert r["extra_replica_gib_total"] == pytest.approx(84 * 2 * 2 / 2**20)  # x 2 chips
  one = cm.sharded(100, fixed=28, own=23, data=1, page_kib=2.0, tp=2)
  assert (one["max_agents"], one["pooled_max_agents"], one["lost_vs_pooled"],
          one["replicated_fixed_pages"], one["extra_replica_pages"]) == (3, 3, 0, 28, 0)


def test_prefix_shares_its_common_prefix_only_within_a_shard(cm):
  # 10 common-prefix pages per shard, 57.5 per agent: (100 - 10) / 57.5 = 1.57 -> 1 per shard;
  # one pool of 200 pages: 190 / 57.5 = 3.3 -> 3
  r = cm.sharded(100, fixed=10, own=57.5, data=2, page_kib=1.0, tp=1)
  assert (r["max_agents"], r["pooled_max_agents"], r["replicated_fixed_pages"]) == (2, 3, 20)


def test_shard_pages_from_free_hbm_per_chip(cm):
  # kv bytes per token: 2 (k, v) x 2 layers x 2 kv heads x 8 dims x 2 bytes = 128; page 2 KiB.
  # 10 GiB x 0.9 = 9 GiB usable; 2^29 params x 2 bytes = 1 GiB of weights at tp = 1.
  toy = cm.Model("toy", layers=2, heads=4, kv_heads=2, head_dim=8, params=2.0**29)
  hw = cm.Hardware("toy", 10.0, (1, 2, 4))
  one = cm.shard_pages(toy, hw, 1, page_size=16)
  assert one["pages_per_shard"] == 8 * 2**30 // 2048          # 8 GiB free / 2 KiB
  two = cm.shard_pages(toy, hw, 2, page_size=16)
  assert two["pages_per_shard"] == int(8.5 * 2**30) // 1024   # half the weights, half a page
  four = cm.shard_pages(toy, hw, 4, page_size=16)  # 2 kv heads: replicated past tp = 2
  assert four["page_kib_per_chip"] == 1.0
  assert four["pages_per_shard"] == int(8.75 * 2**30) // 1024


def test_projection_end_to_end(tmp_path, cm, monkeypatch):
  # one kv head of 2^18 dims, one layer, no weights: a page is 16 x 2^20 bytes = 16 MiB;
  # 1.75 GiB x 0.9 = 1612.8 MiB -> 100 pages per shard (tp = 1)
  toy = cm.Model("toy", layers=1, heads=1, kv_heads=1, head_dim=2**18, params=0.0)
  monkeypatch.setattr(cm, "QWEN25_7B", toy)
  monkeypatch.setattr(cm, "QWEN25_14B", toy)
  monkeypatch.setattr(cm, "HARDWARE", (cm.Hardware("toy", 1.75, (1,)),))
  path, out = tmp_path / "s.json", tmp_path / "cap.json"
  path.write_text(json.dumps(storage(TINY)))
  assert cm.main(["--input", str(path), "--data", "1,2,4", "--json", str(out),
                  "--plot", str(tmp_path / "cap.png")]) == 0
  assert (tmp_path / "cap.png").stat().st_size > 0
  result = json.loads(out.read_text())
  rows = result["rows"][:3]  # the first model, tp = 1, D = 1, 2, 4
  assert [r["data"] for r in rows] == [1, 2, 4]
  assert [r["chips"] for r in rows] == [1, 2, 4]
  assert {r["pages_per_shard"] for r in rows} == {100}  # HBM per chip fixed as D grows
  # tokendance (28 + 23 n), prefix (10 + 57.5 n), full (70 n) in 100 pages per shard:
  # 3, 1, 1 agents per shard
  assert [r["tokendance"]["max_agents"] for r in rows] == [3, 6, 12]
  assert [r["prefix"]["max_agents"] for r in rows] == [1, 2, 4]
  assert [r["full"]["max_agents"] for r in rows] == [1, 2, 4]
  assert [r["tokendance"]["ratio_vs_data1"] for r in rows] == [1.0, 2.0, 4.0]
  assert [r["tokendance"]["replicated_fixed_pages"] for r in rows] == [28, 56, 112]
  # pooled: (100 D - 28) / 23 -> 3, 7, 16; prefix (100 D - 10) / 57.5 -> 1, 3, 6;
  # full 100 D / 70 -> 1, 2, 5 (no replicas: only the per-shard rounding)
  assert [r["tokendance"]["lost_vs_pooled"] for r in rows] == [0, 1, 4]
  assert [r["prefix"]["lost_vs_pooled"] for r in rows] == [0, 1, 2]
  assert [r["full"]["lost_vs_pooled"] for r in rows] == [0, 0, 1]
  assert [r["tokendance_over_prefix"] for r in rows] == [3.0, 3.0, 3.0]
  assert result["memory_ratio_prefix_over_tokendance"] == 2.0  # 60 / 30 pages
  assert result["data"] == [1, 2, 4]


def test_data_degrees_must_include_one(tmp_path, cm):
  path = tmp_path / "s.json"
  path.write_text(json.dumps(storage(TINY)))
  with pytest.raises(SystemExit):
    cm.main(["--input", str(path), "--data", "2,4", "--json", str(tmp_path / "c.json"),
             "--plot", str(tmp_path / "c.png")])


def test_a_result_without_both_methods_is_refused(tmp_path, cm):
  path = tmp_path / "s.json"
  path.write_text(json.dumps(storage([point("prefix", 8, 60, 40)])))
  with pytest.raises(ValueError, match="both prefix and tokendance"):
    cm.measured_pages(path)
