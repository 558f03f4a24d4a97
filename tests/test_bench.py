"""`tokendance bench`: each experiment at --quick size on the real model, and bad arguments."""

from __future__ import annotations

import json

import pytest

from tokendance_jax import cli

TARGETS = ("shared_kv_vs_prefix", "whole_kv_vs_prefix", "prefill_vs_cacheblend",
           "agents_under_slo_vs_prefix", "top1_vs_full")


def _bench(tmp_path, experiment: str, *extra: str) -> dict:
  out, png = tmp_path / f"{experiment}.json", tmp_path / f"{experiment}.png"
  assert cli.main(["bench", experiment, "--quick", "--json", str(out), "--plot", str(png),
                   *extra]) == 0
  assert png.stat().st_size > 1000
  result = json.loads(out.read_text())
  assert result["experiment"] == experiment
  assert result["model"] == "SmolLM2-135M-Instruct"
  assert result["points"]
  for p in result["points"]:
    assert isinstance(p["method"], str) and p["agents"] >= 1, p
  for name in TARGETS:
    r = result["ratios"][name]
    assert {"measured", "target", "agents", "met"} <= set(r), (name, r)
    assert r["measured"] is None or r["measured"] >= 0
  return result


def _runs(result: dict) -> dict:
  return {(p["method"], p["agents"]): p for p in result["points"] if p["kind"] != "trial"}


@pytest.mark.real_model
def test_storage_quick(tmp_path):
  result = _bench(tmp_path, "storage")
  runs = _runs(result)
  assert {"full", "prefix", "tokendance"} <= {m for m, _ in runs}
  for p in runs.values():
    assert p["kv_bytes_per_agent"] >= p["shared_kv_bytes_per_agent"] > 0
    assert 0 < p["private_share"] < 1 and 0 < p["computed_fraction"] <= 1
    assert p["leaked_pages"] == 0 and len(p["per_round"]) == 2
  td = runs[("tokendance", 2)]
  assert 0 <= td["trace_match"] <= 1 and 0 <= td["top1_agreement"] <= 1
  assert runs[("prefix", 2)]["top1_agreement"] == 1.0  # prefix reuse is exact
  r = result["ratios"]["shared_kv_vs_prefix"]
  assert r["agents"] == 2 and r["measured"] > 0 and r["met"] is None  # stated for 64 agents
  assert result["ratios"]["prefill_vs_cacheblend"]["measured"] is None


@pytest.mark.real_model
def test_prefill_quick(tmp_path):
  result = _bench(tmp_path, "prefill")
  runs = _runs(result)
  assert {"tokendance", "cacheblend", "epic"} <= {m for m, _ in runs}
  for m in ("tokendance", "cacheblend", "epic"):
    p = runs[(m, 2)]
    parts = sum(p[k] for k in ("check_seconds", "recompute_seconds", "copy_seconds",
                               "master_prefill_seconds", "other_seconds"))
    assert parts == pytest.approx(p["prefill_seconds"], rel=1e-6, abs=1e-6)
    assert p["prefill_seconds_net"] <= p["prefill_seconds"]
  assert runs[("epic", 2)]["select"] == "epic" and runs[("cacheblend", 2)]["select"] == "block"
  assert set(result["ratios"]["prefill_vs_cacheblend"]["by_agents"]) == {"2"}


@pytest.mark.real_model
def test_capacity_quick(tmp_path):
  result = _bench(tmp_path, "capacity")
  assert result["slo_seconds"] > 0 and result["num_pages"] == 40
  trials = [p for p in result["points"] if p["kind"] == "trial"]
  for method in ("prefix", "tokendance"):
    cap = result["capacity"][method]["agents"]
    mine = {p["agents"]: p["fits"] for p in trials if p["method"] == method}
    assert all(mine[n] for n in mine if n <= cap) and all(not mine[n] for n in mine if n > cap)
  assert "top1_agreement" in _runs(result)[("tokendance", 2)]
  r = result["ratios"]["agents_under_slo_vs_prefix"]
  assert r["target"] == 3.0 and (r["measured"] is None or r["measured"] >= 0)


@pytest.mark.parametrize("argv, message", [
    (["bench", "latency"], "unknown experiment 'latency'"),
    (["bench", "storage", "--agents", "4,0"], "--agents '4,0': agent counts must be >= 1, got 0"),
    (["bench", "storage", "--agents", "four"], "--agents 'four' must be comma-separated"),
    (["bench", "prefill", "--methods", "tokendance,vllm"], "--methods 'vllm' is not one of"),
    (["bench", "prefill", "--recompute", "1.5"], "--recompute 1.5 must be in [0, 1]"),
    (["bench", "capacity", "--agents", "1,2,4"], "capacity takes a search range"),
    (["bench", "storage", "--preset", "smallville"], "--preset 'smallville' is not one of"),
    (["bench", "capacity", "--slo-seconds", "0"], "--slo-seconds 0.0 must be > 0"),
    (["bench", "storage", "--agents", "2,4", "--quality-agents", "3"], "3 is not in --agents"),
    (["bench", "storage", "--output-masters", "cache"], "--output-masters 'cache' is not one of"),
])
def test_bad_arguments(argv, message, capsys, monkeypatch):
  from tokendance_jax import api

  monkeypatch.setattr(api, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
  assert cli.main(argv) == 2
  assert message in capsys.readouterr().err
