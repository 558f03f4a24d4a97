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
    (["bench", "storage", "--masters", "cache"], "--masters 'cache' is not one of"),
    (["bench", "storage", "--masters", "context,context"], "names a policy twice"),
    (["bench", "storage", "--methods", "prefix:anchored"], "prefix makes no masters"),
    (["bench", "sweep", "--taus", "0.1,-1"], "values must be finite and >= 0"),
    (["bench", "sweep", "--taus", "inf"], "values must be finite and >= 0"),
    (["bench", "storage", "--tau", "inf"], "--tau inf must be a finite number >= 0"),
    (["bench", "sweep", "--tau", "0.1"], "takes its thresholds from --taus"),
    (["bench", "sweep", "--fractions", "0.1,2"], "--fractions '0.1,2': values must be in [0, 1]"),
    (["bench", "sweep", "--selects", "block,random"], "--selects 'random' is not one of"),
    (["bench", "sweep", "--no-quality"], "the sweep measures quality"),
])
def test_bad_arguments(argv, message, capsys, monkeypatch):
  from tokendance_jax import api

  monkeypatch.setattr(api, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
  assert cli.main(argv) == 2
  assert message in capsys.readouterr().err


@pytest.mark.real_model
def test_sweep_quick(tmp_path):
  result = _bench(tmp_path, "sweep")
  ref = next(p for p in result["points"] if p["kind"] == "reference")
  assert ref["method"] == "full" and ref["forced_top1"] == 1.0  # paged full == dense full
  sweep = {p["recompute"]: p for p in result["points"] if p["kind"] == "sweep"}
  assert set(sweep) == {0.0, 1.0}
  exact = sweep[1.0]  # reuse with recompute 1.0 gives full recompute's outputs and logits
  assert exact["trace_match"] == 1.0 and exact["forced_top1"] == 1.0
  assert exact["forced_tokens"] == sum(r["output_tokens"] for r in exact["per_round"])
  assert exact["mean_kl"] < 1e-6
  # ... without recomputing the exact head (the system prompt's master is exact)
  assert sweep[0.0]["computed_fraction"] < exact["computed_fraction"] < 1.0
  for p in sweep.values():
    assert p["shared_kv_vs_prefix"] > 0 and p["whole_kv_vs_prefix"] > 0
  bar = result["quality_bar"]["tokendance/block/2"]
  expected = 0.0 if sweep[0.0]["forced_top1"] >= 0.99 else 1.0  # 1.0 always holds (exact)
  assert bar["recompute"] == expected and bar["tried"] == [0.0, 1.0]
  assert len(exact["forced_top1_by_round"]) == 2


def test_master_policies_expand_reuse_methods():
  """--masters runs each reuse method once per policy: the first under its plain name."""
  from tokendance_jax.eval import config

  parser = cli.build_parser()
  args = parser.parse_args(["bench", "storage", "--methods", "prefix,tokendance,cacheblend@8",
                            "--masters", "context,anchored"])
  bc = config.config_from_args(args)
  assert bc.methods == [("prefix", None), ("tokendance", None), ("tokendance:anchored", None),
                        ("cacheblend", 8), ("cacheblend:anchored", 8)]
  assert config.reuse_policy(bc, "tokendance").masters == "context"
  assert config.reuse_policy(bc, "tokendance:anchored").masters == "anchored"
  assert config.split_label("cacheblend:anchored", bc) == ("cacheblend", "anchored")
  args = parser.parse_args(["bench", "storage", "--methods", "tokendance,tokendance:decode"])
  assert config.config_from_args(args).methods == [("tokendance", None),
                                                   ("tokendance:decode", None)]


def test_epic_runs_without_the_threshold_mode():
  """--tau applies to the deviation-ranked selections; EPIC picks its own tokens, so its
  policy has no tau (ReusePolicy refuses the pair) instead of failing after other runs."""
  from tokendance_jax.eval import config

  args = cli.build_parser().parse_args(["bench", "prefill", "--methods", "tokendance,epic",
                                        "--tau", "0.01"])
  bc = config.config_from_args(args)
  assert config.reuse_policy(bc, "tokendance").tau == 0.01
  epic = config.reuse_policy(bc, "epic")
  assert epic.tau is None and epic.select == "epic"


def test_quality_bar_needs_every_higher_fraction_to_hold():
  from tokendance_jax.eval.experiments import quality_bar

  def pt(r, top1, tau=None, method="tokendance"):
    return dict(kind="sweep", method=method, select="block", agents=8, recompute=r, tau=tau,
                forced_top1=top1, computed_fraction=r, shared_kv_vs_prefix=1 / (r + 0.1),
                whole_kv_vs_prefix=1.0, private_share=0.2)

  bar = quality_bar([pt(0.05, 1.0), pt(0.15, 0.95), pt(0.3, 0.995), pt(0.5, 1.0)], 0.99)
  assert bar["tokendance/block/8"]["recompute"] == 0.3  # the lone pass at 0.05 does not count
  bar = quality_bar([pt(0.3, 0.995), pt(0.5, 0.98)], 0.99)
  assert bar["tokendance/block/8"]["recompute"] is None
  # Threshold runs: the cheapest is the highest tau, and every lower tau must hold too.
  bar = quality_bar([pt(0.15, 1.0, tau=0.05), pt(0.15, 0.97, tau=0.1),
                     pt(0.15, 0.995, tau=0.2), pt(0.15, 0.999, tau=0.02),
                     pt(0.05, 0.999, method="tokendance:anchored")], 0.99)
  assert bar["tokendance/block/8/tau"]["tau"] == 0.05
  assert bar["tokendance/block/8/tau"]["tried"] == [0.02, 0.05, 0.1, 0.2]
  assert bar["tokendance:anchored/block/8"]["recompute"] == 0.05


def test_the_quality_target_reads_the_forced_top1():
  """The 0.99 bar is on the forced top-1 (every output token), not the one next-token sample
  per agent: a point with next-token top-1 1.0 but forced 0.988 misses it."""
  from tokendance_jax.eval.experiments import ratios

  pts = [dict(kind="run", method="prefix", agents=16, kv_bytes_per_agent=2.0,
              shared_kv_bytes_per_agent=2.0),
         dict(kind="run", method="tokendance", agents=16, kv_bytes_per_agent=1.0,
              shared_kv_bytes_per_agent=1.0, top1_agreement=1.0, forced_top1=0.988,
              computed_fraction=0.3, private_share=0.2)]
  q = ratios("storage", pts)["top1_vs_full"]
  assert q["measured"] == 0.988 and q["met"] is False and q["metric"] == "forced_top1"
  del pts[1]["forced_top1"]  # without forced samples it falls back to the next-token top-1
  q = ratios("storage", pts)["top1_vs_full"]
  assert q["measured"] == 1.0 and q["metric"] == "top1_agreement"


def test_forced_top1_counts_disagreements():
  """Outputs equal to the dense greedy continuation agree everywhere; one flipped token is
  one miss (of the tokens of that agent) - and only that one."""
  import jax
  import numpy as np

  from tokendance_jax import model
  from tokendance_jax.config import TINY
  from tokendance_jax.eval import quality

  params = model.init_params(TINY, jax.random.PRNGKey(0))
  prompt = list(np.random.default_rng(0).integers(3, TINY.vocab_size, size=21))
  out = []
  for _ in range(6):  # greedy continuation by the dense path, one token at a time
    seq = prompt + out
    out.append(int(quality.dense_reference(params, seq, TINY, len(seq) - 1)[0][-1]))
  res = {"rounds": [{"round": 0, "outputs": {"a": out}}], "prompts": [{"a": prompt}]}
  got = quality.forced_top1((params, TINY, None), res)
  assert got == {"forced_top1": 1.0, "forced_tokens": 6, "first_top1": 1.0,
                 "forced_top1_by_round": [1.0], "outputs_reproduced": 1.0}
  flipped = out[:3] + [(out[3] + 1) % TINY.vocab_size] + out[4:]
  res["rounds"][0]["outputs"]["a"] = flipped
  got = quality.forced_top1((params, TINY, None), res)
  # position 3 misses; positions 4, 5 now follow another history and may or may not agree
  assert got["first_top1"] == 1.0 and got["forced_top1"] <= 5 / 6
  assert got["outputs_reproduced"] == 0.0
  assert quality.forced_top1((params, TINY, None), res, agents={"b"})["forced_tokens"] == 0


def test_prefill_flops_match_the_matrix_shapes():
  """ModelConfig.prefill_flops against a count written out from each matmul's shape."""
  from tokendance_jax.config import TINY as c

  positions = [0, 3, 4, 9]
  t, keys = len(positions), sum(p + 1 for p in positions)
  per_layer = (t * c.d_model * c.n_heads * c.head_dim           # q
               + 2 * t * c.d_model * c.n_kv_heads * c.head_dim  # k, v
               + t * c.n_heads * c.head_dim * c.d_model         # o
               + 3 * t * c.d_model * c.ffn_dim                  # gate, up, down
               + 2 * keys * c.n_heads * c.head_dim)             # scores, weighted values
  assert c.prefill_flops(positions) == pytest.approx(2 * per_layer * c.n_layers, rel=1e-9)
  assert c.prefill_flops(positions, layers=1) == pytest.approx(2 * per_layer, rel=1e-9)
  assert c.prefill_flops([]) == 0.0


def test_dense_next_token_quality_is_exact_on_the_reference_itself():
  """Log-probs equal to the dense reference's give top-1 1 and KL 0; another distribution
  does not (the comparison is at each prompt's end, not at the end of its output)."""
  import jax
  import numpy as np

  from tokendance_jax import model
  from tokendance_jax.config import TINY
  from tokendance_jax.eval import quality

  params = model.init_params(TINY, jax.random.PRNGKey(1))
  rng = np.random.default_rng(1)
  prompts = {a: list(rng.integers(3, TINY.vocab_size, size=n)) for a, n in (("a", 9), ("b", 14))}
  outputs = {"a": [5, 6], "b": []}
  ref = {a: quality.dense_reference(params, p + outputs[a], TINY, len(p) - 1)[1]
         for a, p in prompts.items()}
  q = quality.dense_next_token_quality((params, TINY, None), prompts, outputs, ref)
  assert q["top1_agreement"] == 1.0 and q["max_kl"] < 1e-6
  flat = {a: np.full_like(v, -np.log(v.size)) for a, v in ref.items()}
  q = quality.dense_next_token_quality((params, TINY, None), prompts, outputs, flat)
  assert q["mean_kl"] > 0.1
  # The reference at the prompt's end does not depend on the output that follows it.
  np.testing.assert_allclose(quality.dense_reference(params, prompts["a"], TINY, 8)[1], ref["a"],
                             atol=1e-5)
