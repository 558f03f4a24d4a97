"""benchmarks/capacity_model.py reads a `tokendance bench storage` result and projects it."""

import importlib.util
import json
import pathlib
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def capacity_model():
  spec = importlib.util.spec_from_file_location("capacity_model",
                                                REPO / "benchmarks" / "capacity_model.py")
  mod = importlib.util.module_from_spec(spec)
  sys.modules["capacity_model"] = mod  # dataclasses look their module up there
  spec.loader.exec_module(mod)
  return mod


def point(method, agents, kv_pages, page_bytes=1 << 20):
  return dict(kind="run", method=method, agents=agents, kv_bytes_per_agent=kv_pages * page_bytes,
              shared_kv_bytes_per_agent=kv_pages * page_bytes / 2, bytes_per_page=page_bytes,
              prompt_tokens_per_agent=1000.0)


def test_storage_results_feed_the_projection(tmp_path, capacity_model):
  data = {"experiment": "storage", "model": "SmolLM2-135M-Instruct", "preset": "agent_society",
          "config": {"page_size": 16, "recompute": 0.05, "select": "block"},
          "points": [point("prefix", 8, 60), point("tokendance", 8, 30),
                     point("prefix", 64, 160), point("tokendance", 64, 40),
                     point("tokendance:anchored", 64, 45), point("full", 8, 70)]}
  path = tmp_path / "storage.json"
  path.write_text(json.dumps(data))
  measured = capacity_model.measured_pages(path)
  assert measured["agents"] == 64  # the largest count with both methods
  assert set(measured["methods"]) == {"prefix", "tokendance"}  # no full point at 64
  assert measured["methods"]["tokendance"]["pages_per_agent"] == 40
  rows = capacity_model.project(measured)
  for r in rows:  # 4x fewer pages per agent: about 4x the agents wherever any fit
    if r["prefix"]["max_agents"] >= 10:
      assert 3.5 <= r["tokendance_over_prefix"] <= 4.5
  out = tmp_path / "cap.json"
  assert capacity_model.main(["--input", str(path), "--json", str(out),
                              "--plot", str(tmp_path / "cap.png")]) == 0
  result = json.loads(out.read_text())
  assert result["memory_ratio_prefix_over_tokendance"] == 4.0
  assert result["memory_ratio_full_over_tokendance"] is None


def test_a_result_without_both_methods_is_refused(tmp_path, capacity_model):
  path = tmp_path / "s.json"
  path.write_text(json.dumps({"experiment": "storage", "model": "m", "preset": "p",
                              "config": {"page_size": 16, "recompute": 0.1, "select": "block"},
                              "points": [point("prefix", 8, 60)]}))
  with pytest.raises(ValueError, match="both prefix and tokendance"):
    capacity_model.measured_pages(path)
