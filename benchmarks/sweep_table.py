"""Markdown tables from `tokendance bench sweep` results (the README's sweep tables).

    python benchmarks/sweep_table.py docs/results/bench_sweep_agent_society.json [more.json ...]

One row per swept point, in file order: master policy, selection, setting
(fixed fraction, or tau with its cap), the share of its shared tokens each
agent recomputed (mean, min-max over agent-rounds), prompt tokens computed,
forced top-1 (all rounds, and the last round alone), mean next-token KL,
greedy-trace match with `full`, and KV per agent against `prefix`. Then the
quality bar found in each file.
"""

from __future__ import annotations

import argparse
import json
import pathlib

HEADER = ("| masters | selection | setting | shared tokens recomputed per agent: mean (min-max) "
          "| prompt tokens computed | forced top-1 (last round), tokens that differ | mean KL "
          "| trace match | shared KV vs prefix | whole KV vs prefix |")


def setting(p: dict) -> str:
  if p.get("tau") is None:
    return f"r = {p['recompute']:g}"
  return f"tau = {p['tau']:g} (cap {p['recompute']:g})"


def row(p: dict) -> str:
  by = p.get("shared_recomputed_by_agent") or {}
  spread = (f"{100 * by['mean']:.1f}% ({100 * by['min']:.0f}-{100 * by['max']:.0f}%)"
            if by else "-")
  last = (p.get("forced_top1_by_round") or [None])[-1]
  last_s = f" ({last:.3f})" if last is not None else ""
  n = p.get("forced_tokens")
  if n:  # a rounded 0.990 can be 0.9896, below the bar: say how many tokens differ
    last_s += f", {round(n * (1 - p['forced_top1']))} of {n} differ"
  masters = p.get("masters") or p["method"].partition(":")[2] or "context"
  return (f"| {masters} | {'token' if p['select'] == 'cacheblend' else p['select']} "
          f"| {setting(p)} | {spread} | {100 * p['computed_fraction']:.1f}% "
          f"| {p['forced_top1']:.3f}{last_s} | {p.get('mean_kl', float('nan')):.3f} "
          f"| {p.get('trace_match', float('nan')):.3f} | {p['shared_kv_vs_prefix']:.2f}x "
          f"| {p['whole_kv_vs_prefix']:.2f}x |")


def table(result: dict) -> str:
  c = result["config"]
  lines = [f"{c['preset']}, {c['agents'][0]} agents, {c['rounds']} rounds, {c['max_tokens']} tokens "
           f"per output" + (f", order {c['order']}" if c.get("order") else ""), "", HEADER,
           "|" + "---|" * HEADER.count(" | ") + "---|"]
  lines += [row(p) for p in result["points"] if p["kind"] == "sweep"]
  ref = [p for p in result["points"] if p["kind"] == "reference"]
  if ref:
    lines.append(f"\n(`full` against the dense reference: forced top-1 {ref[0]['forced_top1']:.3f}.)")
  bars = []
  for key, b in result.get("quality_bar", {}).items():
    what = (f"r = {b['recompute']:g}" if b["mode"] == "fraction" and b["recompute"] is not None
            else f"tau = {b['tau']:g}" if b["mode"] == "tau" and b["tau"] is not None else "none")
    bars.append(f"{key}: {what}")
  if bars:
    lines.append("\nCheapest setting holding forced top-1 >= 0.99 (with every costlier one): "
                 + "; ".join(bars) + ".")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("results", nargs="+")
  args = p.parse_args(argv)
  for path in args.results:
    print(table(json.loads(pathlib.Path(path).read_text())))
    print()
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
