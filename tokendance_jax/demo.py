"""`tokendance demo`: what the library is for, on the real model, in a few minutes.

One AgentSociety-style run (16 citizens, 2 rounds; in round 1 every citizen
reads every other's round-0 message, each at its own offset) goes through three
methods with the same pool and the same greedy sampling:

- `full`: every agent prefills its whole prompt (the quality reference);
- `prefix`: vLLM-style automatic prefix caching;
- `tokendance`: context masters, one collective check / select / recompute for
  the whole round, agents stored as mirrors of the masters.

It prints, side by side: KV per agent, the round prefill time without JAX
compile seconds (compile is reported apart, so the method that runs first is
not charged for it), the share of prompt tokens computed, and agreement with
`full`: identical greedy outputs (agents and tokens) and the teacher-forced
top-1 of every output token against an unpaged full prefill.
"""

from __future__ import annotations

import time

# The demo's defaults (the `demo` subcommand's flags override them).
DEFAULTS = dict(preset="agent_society", agents=16, rounds=2, max_tokens=16, select="block",
                recompute=0.05)
METHODS = ("full", "prefix", "tokendance")


def demo_config(args):
  """The `bench.BenchConfig` of the demo run, from the parsed `demo` arguments."""
  from tokendance_jax import bench

  return bench.BenchConfig(
      experiment="demo", preset=args.preset, agents=[args.agents], rounds=args.rounds,
      methods=[(m, None) for m in METHODS], select=args.select, recompute=args.recompute,
      check_layer=args.check_layer, masters=[args.masters], tau=args.tau,
      max_tokens=args.max_tokens, num_pages=None, page_size=args.page_size,
      slo_seconds=bench.SLO_SECONDS, order=args.order, seed=args.seed, quality_agents=[],
      quick=False)


def run(bc, progress: bool = True) -> dict:
  """Every method of the demo at bc.agents[0] agents: {"runs", "points", "seconds"}.

  Points are `bench.run_point` summaries of rounds >= 1 (round 0 has no outputs
  to share), each with `outputs_identical` (agents whose greedy outputs equal
  full's in every round) and, for tokendance, the forced top-1 over all rounds.
  """
  from tokendance_jax import bench

  model = bench.load_model()
  n, runs, points = bc.agents[0], {}, {}
  start = time.perf_counter()
  for method, _ in bc.methods:
    t0 = time.perf_counter()
    runs[method] = bench.run_method(model, bc, method, n, quality=False, num_pages=None)
    p = bench.run_point(runs[method], runs["full"])
    p["outputs_identical"] = identical_agents(runs["full"], runs[method])
    if method == "tokendance":
      p.update(bench.forced_top1(model, runs[method]))
    points[method] = p
    if progress:
      print(f"[{method}: {time.perf_counter() - t0:.0f} s]", flush=True)
  return {"runs": runs, "points": points, "seconds": time.perf_counter() - start,
          "tokenizer": model[2]}


def identical_agents(ref: dict, res: dict) -> float:
  """Share of agents whose greedy outputs equal `ref`'s in every round."""
  agents = ref["rounds"][0]["outputs"].keys()
  same = [all(a["outputs"][k] == b["outputs"].get(k) for a, b in
              zip(ref["rounds"], res["rounds"], strict=True)) for k in agents]
  return sum(same) / max(len(same), 1)


def report(result: dict, bc) -> str:
  """The table a newcomer reads, and the ratios that matter."""
  pts = result["points"]
  mib = 2**20
  lines = [f"{bc.preset}, {bc.agents[0]} agents, {bc.rounds} rounds, {bc.max_tokens} tokens per "
           f"output; tokendance: masters {bc.masters[0]}, {bc.select} selection, recompute "
           f"{bc.recompute:g}" + (f", tau {bc.tau:g}" if bc.tau is not None else ""),
           "figures are round 1 (the round that reuses the other agents' outputs); agreement "
           "covers every round", "",
           f"{'method':11s} {'KV/agent MiB':>12s} {'shared KV/agent':>15s} {'prefill s':>9s} "
           f"{'compile s':>9s} {'computed':>8s} {'same outputs':>12s} {'token match':>11s} "
           f"{'forced top-1':>12s}"]
  for method, p in pts.items():
    forced = f"{p['forced_top1']:.3f}" if p.get("forced_top1") is not None else "-"
    lines.append(
        f"{method:11s} {p['kv_bytes_per_agent'] / mib:12.2f} "
        f"{p['shared_kv_bytes_per_agent'] / mib:15.2f} {p['prefill_seconds_net']:9.2f} "
        f"{p['compile_seconds']:9.1f} {100 * p['computed_fraction']:7.0f}% "
        f"{100 * p['outputs_identical']:11.0f}% {100 * p['trace_match']:10.1f}% {forced:>12s}")
  td, pre = pts["tokendance"], pts["prefix"]
  lines += ["", "tokendance against prefix caching: "
            f"{pre['kv_bytes_per_agent'] / td['kv_bytes_per_agent']:.1f}x less KV per agent "
            f"({pre['shared_kv_bytes_per_agent'] / td['shared_kv_bytes_per_agent']:.1f}x in the "
            f"shared region), prefill "
            f"{pre['prefill_seconds_net'] / max(td['prefill_seconds_net'], 1e-9):.2f}x faster, "
            f"greedy outputs identical to full for {100 * td['outputs_identical']:.0f}% of agents "
            f"({100 * td['trace_match']:.1f}% of tokens; prefix: "
            f"{100 * pre['trace_match']:.1f}%)."]
  verdict = []
  if td["kv_bytes_per_agent"] >= pre["kv_bytes_per_agent"]:
    verdict.append("tokendance does NOT use less KV here")
  if td["prefill_seconds_net"] >= pre["prefill_seconds_net"]:
    verdict.append("tokendance's prefill is NOT faster here (2 CPU cores; see the README)")
  if td["trace_match"] < pre["trace_match"]:
    verdict.append(f"its outputs differ from full on {100 * (1 - td['trace_match']):.1f}% of "
                   "tokens, where prefix caching is exact")
  if verdict:
    lines.append("Note: " + "; ".join(verdict) + ".")
  return "\n".join(lines)


def show_outputs(result: dict, agents: int = 3) -> str:
  """Round 1 outputs of the first agents, full beside tokendance."""
  tok = result["tokenizer"]
  last = {m: r["rounds"][-1]["outputs"] for m, r in result["runs"].items()}
  lines = [f"round {len(result['runs']['full']['rounds']) - 1} outputs (full | tokendance):"]
  for agent in list(last["full"])[:agents]:
    for m in ("full", "tokendance"):
      text = " ".join(tok.decode(last[m][agent]).split())
      lines.append(f"  [{agent} {m:10s}] {text[:150]}")
  return "\n".join(lines)


def cmd_demo(args) -> int:
  bc = demo_config(args)
  print(f"tokendance demo: {bc.preset} with {bc.agents[0]} agents x {bc.rounds} rounds on "
        "SmolLM2-135M-Instruct (CPU); methods run one after another: full, prefix, tokendance",
        flush=True)
  result = run(bc)
  print()
  print(show_outputs(result))
  print()
  print(report(result, bc))
  print(f"\n[{result['seconds']:.0f} s in all]")
  return 0
