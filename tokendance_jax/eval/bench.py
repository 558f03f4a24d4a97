"""`tokendance bench`: the storage, prefill, capacity and sweep experiments on the real model.

  tokendance bench storage  --json out/bench_storage.json  --plot out/bench_storage.png
  tokendance bench prefill  --agents 2,4,8,16 --json out/bench_prefill.json --plot ...
  tokendance bench capacity --num-pages 384 --slo-seconds 30 --json ... --plot ...
  tokendance bench sweep    --agents 8 --fractions 0,0.15,0.3 --selects block,cacheblend ...

- storage: per-agent KV bytes (whole, and the shared region) of every method as
  agents grow; ratio prefix / tokendance.
- prefill: round prefill time of tokendance against per-request cacheblend and
  epic with the same selection; split into check, recompute, copies, master
  prefill and the rest.
- capacity: the most agents each method serves on a fixed page pool with every
  round inside a latency SLO and no preemption; ratio tokendance / prefix.
- sweep: tokendance at every recompute fraction x selection (block-aligned or
  token-level) against `full` (quality) and `prefix` (storage); the lowest
  fraction whose forced top-1 holds 99% (`quality_bar`).

prefill also counts the model FLOPs of the check and recompute steps and
reports their GFLOP/s against a matmul peak measured in the same run;
`--profile DIR` records a `jax.profiler` trace and summarizes it per phase.

Every experiment also measures quality on a subset of points against full
recompute of the same prompts by the unpaged dense path (`dense_reference`):
next-token top-1 / KL per round, greedy-trace token match with a `full` run
where one was made, and the forced top-1 over every output token (the
quality bar's measure). Times exclude JAX
tracing and compilation (a server compiles its
shape buckets once); the compile seconds are reported beside them.
The JSON has "experiment", "model", "points" (each with "method" and
"agents") and "ratios" (each target: measured, target, agents, met).
"""

from __future__ import annotations

import argparse
import json
import pathlib

from tokendance_jax.eval.config import ORDERS, PRESETS, SLO_SECONDS, config_from_args
from tokendance_jax.eval.experiments import run
from tokendance_jax.eval.plots import plot
from tokendance_jax.eval.runner import load_model

__all__ = ["add_parser", "cmd_bench", "load_model", "plot", "run"]


def add_parser(subparsers) -> argparse.ArgumentParser:
  """Add `bench` to an argparse subparsers object; returns the new parser."""
  p = subparsers.add_parser(
      "bench", help="storage / prefill / capacity experiments on the real model; JSON + plot",
      description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="\n\n".join(__doc__.split("\n\n")[1:3]))
  p.add_argument("experiment", metavar="{storage,prefill,capacity,sweep}")
  p.add_argument("--quick", action="store_true",
                 help="smoke-test size (debate, 1-2 agents, 2 rounds, 4 tokens)")
  p.add_argument("--json", default=None, help="default out/bench_<experiment>.json")
  p.add_argument("--plot", default=None, help="default out/bench_<experiment>.png")
  p.add_argument("--preset", default=None, help=f"one of {', '.join(PRESETS)}")
  p.add_argument("--agents", default=None,
                 help="comma-separated agent counts (capacity: the search range LOW,HIGH)")
  p.add_argument("--rounds", type=int, default=None)
  p.add_argument("--methods", default=None,
                 help="comma-separated METHOD[:MASTERS][@MAX_AGENTS]: e.g. "
                      "prefix,tokendance,tokendance:anchored,full@8")
  p.add_argument("--select", default="block", help="cacheblend or block (epic selects its own)")
  p.add_argument("--recompute", type=float, default=0.05,
                 help="fraction of shared tokens (with --tau / --taus: the cap)")
  p.add_argument("--fractions", default=None,
                 help="sweep: comma-separated recompute fractions "
                      "(default 0,0.05,0.1,0.15,0.3,0.5)")
  p.add_argument("--selects", default=None,
                 help="sweep: comma-separated selections, block and/or cacheblend (token-level)")
  p.add_argument("--check-layer", type=int, default=1)
  p.add_argument("--masters", default=None,
                 help="comma-separated master policies (context, anchored, decode; default: the "
                      "library's, context); each reuse method runs once per policy, the first "
                      "under its plain name, the others as METHOD:MASTERS")
  p.add_argument("--tau", type=float, default=None,
                 help="threshold mode: recompute what deviates more than TAU relative to the key "
                      "norm, capped by --recompute")
  p.add_argument("--taus", default=None,
                 help="sweep: comma-separated thresholds, each run with --recompute as the cap "
                      "(block selection), beside the fixed fractions")
  p.add_argument("--max-tokens", type=int, default=None, help="output tokens per agent")
  p.add_argument("--num-pages", type=int, default=None,
                 help="page pool (capacity: the fixed pool, default 384; else sized per point)")
  p.add_argument("--page-size", type=int, default=16)
  p.add_argument("--slo-seconds", type=float, default=SLO_SECONDS,
                 help=f"capacity: round latency SLO (default {SLO_SECONDS:g} s, the paper's "
                      "1.5 s A100 SLO in this CPU machine's terms)")
  p.add_argument("--order", default=None, help=f"one of {', '.join(ORDERS)}")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--quality-agents", default=None,
                 help="agent counts where quality vs full is measured (default: the smallest)")
  p.add_argument("--no-quality", action="store_true", help="skip quality and the full reference")
  p.add_argument("--judge-agents", type=int, default=None,
                 help="measure quality on the first K agents only (the dense full-recompute "
                      "reference, so no `full` run is added); for large agent counts")
  p.add_argument("--profile", default=None, metavar="DIR",
                 help="write a jax.profiler trace of the run to DIR (phases are named "
                      "tokendance/check, /recompute, /copy, /master_prefill; open in Perfetto) "
                      "and a per-phase summary into the JSON; it adds up every method run, so "
                      "profile one method at one size")
  p.set_defaults(func=cmd_bench)
  return p


def cmd_bench(args) -> int:
  """`tokendance bench EXPERIMENT`: run it, write the JSON (after every point too) and the plot,
  print the measured ratios."""
  bc = config_from_args(args)  # bad values fail before the model loads
  json_path = pathlib.Path(args.json or f"out/bench_{bc.experiment}.json")
  plot_path = pathlib.Path(args.plot or f"out/bench_{bc.experiment}.png")
  json_path.parent.mkdir(parents=True, exist_ok=True)
  save = lambda result: json_path.write_text(json.dumps(result, indent=1))  # noqa: E731
  if args.profile:
    from tokendance_jax import profiling

    with profiling.trace(args.profile):
      result = run(bc, checkpoint=save)
    result["profile"] = dict(dir=args.profile, phases=profiling.summarize(args.profile))
  else:
    result = run(bc, checkpoint=save)
  save(result)
  plot(result, str(plot_path))
  for name, r in result["ratios"].items():
    if r["measured"] is not None:
      print(f"{name}: {r['measured']:.3f} (target {r['target']}, {r['agents']} agents, "
            f"met {r['met']})")
  print(f"wrote {json_path} and {plot_path}")
  return 0
