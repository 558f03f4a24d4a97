"""All methods side by side on one multi-agent workload, on the real model, in one run.

For each method (full, prefix, cacheblend, epic, tokendance) runs the same
seeded workload for a few rounds and records per-round prefill time, KV per
agent (whole and shared region), pages, computed fraction and quality
against full recompute. `--sweep` instead varies the recompute fraction for
tokendance (token- and block-level selection) and records quality.

  python benchmarks/round_bench.py --preset agent_society --agents 32 --rounds 2 \\
      --json out/round_bench.json --plot out/round_bench.png
  python benchmarks/round_bench.py --sweep 0,0.05,0.15,0.3 --preset agent_society --agents 16 \\
      --rounds 2 --json out/recompute_sweep.json --plot out/recompute_sweep.png
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform

import jax
import numpy as np

from tokendance_jax import api
from tokendance_jax.config import CacheConfig
from tokendance_jax.eval.runner import summary
from tokendance_jax.roundrun import RoundRunConfig, run_rounds
from tokendance_jax.rounds import METHODS


def _summary(res: dict) -> dict:
  """eval.runner.summary over a run_rounds result (averages over rounds >= 1)."""
  return summary(dict(res, select=res["config"]["select"], recompute=res["config"]["recompute"]))


def run(args) -> dict:
  params, cfg, tok = api.load_model(dtype="float32", progress=False)
  cache_cfg = CacheConfig(num_pages=args.num_pages, page_size=args.page_size)
  base = dict(preset=args.preset, agents=args.agents, rounds=args.rounds, seed=args.seed,
              max_tokens=args.max_tokens, order=args.order)
  runs = []
  if args.sweep:
    for select in ("cacheblend", "block"):
      for r in [float(x) for x in args.sweep.split(",")]:
        runs.append(RoundRunConfig(method="tokendance", select=select, recompute=r, **base))
  else:
    for m in args.methods:
      select = "epic" if m == "epic" else args.select
      runs.append(RoundRunConfig(method=m, select=select, recompute=args.recompute, **base))
  points, raw = [], []
  for rc in runs:
    res = run_rounds(params, cfg, tok, rc, cache_cfg=cache_cfg, progress=True)
    raw.append(res)
    points.append(_summary(res))
    p = points[-1]
    print(f"{rc.method:10s} {rc.select:10s} r={rc.recompute:.2f}: prefill {p['prefill_seconds']:.2f} s, "
          f"KV/agent {p['kv_bytes_per_agent'] / 2**20:.2f} MiB, shared {p['shared_kv_bytes_per_agent'] / 2**20:.2f} MiB, "
          f"computed {100 * p['computed_fraction']:.1f}%, top-1 {p.get('top1_agreement', 1.0):.3f}, "
          f"KL {p.get('mean_kl', 0.0):.4f}", flush=True)
  return dict(experiment="recompute_sweep" if args.sweep else "methods", model="SmolLM2-135M-Instruct",
              preset=args.preset, agents=args.agents, rounds=args.rounds,
              backend=jax.default_backend(), machine=platform.machine(), jax=jax.__version__,
              page_size=args.page_size, points=points, ratios=_ratios(points), runs=raw)


def _ratios(points: list[dict]) -> dict:
  by = {p["method"]: p for p in points}
  td = by.get("tokendance")
  if td is None or len(by) < 2:
    return {}
  out = {}
  if "prefix" in by:
    out["shared_kv_prefix_over_tokendance"] = (by["prefix"]["shared_kv_bytes_per_agent"]
                                               / td["shared_kv_bytes_per_agent"])
    out["kv_prefix_over_tokendance"] = by["prefix"]["kv_bytes_per_agent"] / td["kv_bytes_per_agent"]
  for m in ("cacheblend", "full"):
    if m in by:
      out[f"prefill_{m}_over_tokendance"] = by[m]["prefill_seconds"] / td["prefill_seconds"]
  return out


def plot(result: dict, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  pts = result["points"]
  if result["experiment"] == "recompute_sweep":
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for select in ("cacheblend", "block"):
      sp = [p for p in pts if p["select"] == select]
      x = [p["recompute"] for p in sp]
      axes[0].plot(x, [p["top1_agreement"] for p in sp], "o-", label=select)
      axes[1].plot(x, [p["mean_kl"] for p in sp], "o-", label=select)
      axes[2].plot(x, [p["shared_kv_bytes_per_agent"] / 2**20 for p in sp], "o-", label=select)
    for ax, t in zip(axes, ("top-1 agreement vs full", "mean KL vs full",
                            "shared-region KV / agent (MiB)"), strict=True):
      ax.set_xlabel("recompute fraction of shared tokens")
      ax.set_title(t)
      ax.grid(alpha=0.3)
      ax.legend()
  else:
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    names = [p["method"] for p in pts]
    axes[0].bar(names, [p["kv_bytes_per_agent"] / 2**20 for p in pts], label="whole")
    axes[0].bar(names, [p["shared_kv_bytes_per_agent"] / 2**20 for p in pts], label="shared region")
    axes[0].set_title("KV per agent (MiB)")
    axes[0].legend()
    parts = ("check_seconds", "copy_seconds", "recompute_seconds")
    bottom = np.zeros(len(pts))
    for part in parts:
      vals = np.array([p[part] for p in pts])
      axes[1].bar(names, vals, bottom=bottom, label=part.split("_")[0])
      bottom += vals
    rest = np.array([p["prefill_seconds"] for p in pts]) - bottom
    axes[1].bar(names, np.maximum(rest, 0), bottom=bottom, label="other prefill")
    axes[1].set_title("prefill seconds per round")
    axes[1].legend(fontsize=7)
    axes[2].bar(names, [p.get("mean_kl", 0.0) for p in pts])
    axes[2].set_title("mean KL vs full (next token)")
    for ax in axes:
      ax.tick_params(axis="x", rotation=30)
  fig.suptitle(f"{result['model']}, {result['preset']}, {result['agents']} agents, "
               f"{result['rounds']} rounds ({result['backend']})")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", default="agent_society")
  p.add_argument("--agents", type=int, default=32)
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
  p.add_argument("--select", default="block", choices=["cacheblend", "block"])
  p.add_argument("--recompute", type=float, default=0.05)
  p.add_argument("--sweep", default=None, help="comma-separated recompute fractions")
  p.add_argument("--order", default=None)
  p.add_argument("--max-tokens", type=int, default=None)
  p.add_argument("--num-pages", type=int, default=8192)
  p.add_argument("--page-size", type=int, default=16)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", default="out/round_bench.json")
  p.add_argument("--plot", default="out/round_bench.png")
  args = p.parse_args()
  result = run(args)
  pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
  pathlib.Path(args.json).write_text(json.dumps(result, indent=1))
  plot(result, args.plot)
  print(f"wrote {args.json} and {args.plot}")


if __name__ == "__main__":
  main()
