"""Capacity model: how many agents' KV fit at paper scale, per method.

Measured input: per-agent KV of each method on a real round (SmolLM2-135M,
agent_society), from a `tokendance bench storage` JSON (its largest agent
count with both prefix and tokendance; default docs/results/bench_storage.json)
or a `benchmarks/round_bench.py` JSON (last round). Bytes are converted to
*pages per agent* (page size 16), which depends on the workload's token layout
and the method's mirror fraction, not on the model; the projection multiplies
pages by a target model's page bytes and divides a device's free HBM by it.

    python benchmarks/capacity_model.py --json docs/results/capacity_model.json \\
        --plot docs/results/capacity_model.png

Assumed (not measured here): that pages per agent carry over to Qwen2.5-7B /
14B on the same workload (same prompt lengths, same recompute);
bf16 KV and weights; 90% of HBM usable for weights + KV (the rest:
activations, workspace — vLLM's default utilization); tensor parallelism
splits weights evenly and KV by kv heads, replicating kv heads once TP
exceeds them (each device then holds one kv head per layer); per-agent
figures held constant as agents grow past 32; memory only — no latency SLO
(the paper's 2.7x is agents under a 1500 ms round SLO on A100s).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib

GIB = 2**30
ROOT = pathlib.Path(__file__).resolve().parents[1]
METHODS = ("full", "prefix", "tokendance")


@dataclasses.dataclass(frozen=True)
class Model:
  name: str
  layers: int
  heads: int
  kv_heads: int
  head_dim: int
  params: float  # parameter count

  def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
    return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


# Published configs (Hugging Face config.json of Qwen/Qwen2.5-7B and -14B).
QWEN25_7B = Model("Qwen2.5-7B", layers=28, heads=28, kv_heads=4, head_dim=128, params=7.62e9)
QWEN25_14B = Model("Qwen2.5-14B", layers=48, heads=40, kv_heads=8, head_dim=128, params=14.77e9)
SMOLLM2 = Model("SmolLM2-135M", layers=30, heads=9, kv_heads=3, head_dim=64, params=0.135e9)


@dataclasses.dataclass(frozen=True)
class Hardware:
  name: str
  hbm_gib: float  # per chip (A100/H100 "80GB" = 80 GiB, v5e 16 GiB)
  chips: tuple[int, ...]  # tensor-parallel group sizes considered


HARDWARE = (
    Hardware("A100/H100 80GB", 80.0, (1, 2, 4, 8)),
    Hardware("TPU v5e (16 GB/chip)", 16.0, (1, 2, 4, 8)),
)
PAPER_RATIO = 2.7  # TokenDance vs vLLM prefix caching, agents under a 1500 ms SLO (A100)


def measured_pages(path: pathlib.Path) -> dict:
  """Pages per agent of each method from a bench storage or round_bench JSON."""
  data = json.loads(path.read_text())
  if data.get("experiment") == "storage":
    return _from_storage(data, path)
  run = {r["method"]: r for r in data["runs"]}
  out = {"source": str(path.relative_to(ROOT)), "model": data["model"],
         "preset": data["preset"], "agents": data["agents"], "page_size": data["page_size"],
         "methods": {}}
  for method in METHODS:
    last = run[method]["rounds"][-1]
    page_bytes = run[method]["bytes_per_page"]
    out["methods"][method] = {
        "kv_mib_per_agent": last["kv_bytes_per_agent"] / 2**20,
        "shared_kv_mib_per_agent": last["shared_kv_bytes_per_agent"] / 2**20,
        "pages_per_agent": last["kv_bytes_per_agent"] / page_bytes,
        "prompt_tokens_per_agent": last["stats"]["prompt_tokens"] / data["agents"]}
  return out


def _from_storage(data: dict, path: pathlib.Path) -> dict:
  """A `tokendance bench storage` result: its largest agent count with prefix and tokendance."""
  at = {(p["method"], p["agents"]): p for p in data["points"] if p["kind"] in ("run", "quality")}
  both = [n for m, n in at if m == "tokendance" and ("prefix", n) in at]
  if not both:
    raise ValueError(f"{path}: no agent count with both prefix and tokendance points")
  n = max(both)
  out = {"source": str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path),
         "model": data["model"], "preset": data["preset"], "agents": n,
         "page_size": data["config"]["page_size"], "recompute": data["config"]["recompute"],
         "select": data["config"]["select"], "methods": {}}
  for method in METHODS:
    p = at.get((method, n))
    if p is None:
      continue
    out["methods"][method] = {
        "kv_mib_per_agent": p["kv_bytes_per_agent"] / 2**20,
        "shared_kv_mib_per_agent": p["shared_kv_bytes_per_agent"] / 2**20,
        "pages_per_agent": p["kv_bytes_per_agent"] / p["bytes_per_page"],
        "prompt_tokens_per_agent": p["prompt_tokens_per_agent"]}
  return out


def max_agents(model: Model, hw: Hardware, tp: int, pages_per_agent: float, page_size: int,
               util: float = 0.9) -> dict:
  """Agents whose KV fits one tensor-parallel group of `tp` chips."""
  weights = model.params * 2 / tp  # bf16, split evenly
  free = util * hw.hbm_gib * GIB - weights
  kv_share = 1 / min(tp, model.kv_heads)  # of every page, per device
  per_agent = pages_per_agent * page_size * model.kv_bytes_per_token() * kv_share
  agents = max(0, math.floor(free / per_agent)) if free > 0 else 0
  return {"tp": tp, "weights_gib_per_chip": weights / GIB, "free_gib_per_chip": free / GIB,
          "kv_mib_per_agent_per_chip": per_agent / 2**20, "max_agents": agents,
          "fits": free > 0}


def project(measured: dict) -> list[dict]:
  rows = []
  for model in (QWEN25_7B, QWEN25_14B):
    for hw in HARDWARE:
      for tp in hw.chips:
        row = {"model": model.name, "hardware": hw.name, "chips": tp}
        for method, m in measured["methods"].items():
          row[method] = max_agents(model, hw, tp, m["pages_per_agent"], measured["page_size"])
        p, t = row["prefix"]["max_agents"], row["tokendance"]["max_agents"]
        row["tokendance_over_prefix"] = t / p if p else None
        rows.append(row)
  return rows


def plot(rows: list[dict], path: pathlib.Path, source: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=False)
  for ax, model in zip(axes, (QWEN25_7B.name, QWEN25_14B.name), strict=True):
    sel = [r for r in rows if r["model"] == model]
    labels = [f"{'GPU' if 'A100' in r['hardware'] else 'v5e'} x{r['chips']}" for r in sel]
    width = 0.27
    for k, method in enumerate(m for m in METHODS if m in sel[0]):
      ys = [r[method]["max_agents"] for r in sel]
      ax.bar([i + (k - 1) * width for i in range(len(sel))], ys, width, label=method)
    ax.set_xticks(range(len(sel)), labels, rotation=30)
    ax.set_yscale("symlog", linthresh=10)
    ax.set_title(f"{model}: agents whose KV fits (bf16, 90% HBM)")
    ax.set_ylabel("max agents per tensor-parallel group")
  axes[0].legend()
  fig.suptitle(f"Projected from measured pages/agent ({source}); "
               f"paper: {PAPER_RATIO}x vs prefix under a 1500 ms SLO", fontsize=9)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--input", default=str(ROOT / "docs/results/bench_storage.json"))
  p.add_argument("--json", default=str(ROOT / "docs/results/capacity_model.json"))
  p.add_argument("--plot", default=str(ROOT / "docs/results/capacity_model.png"))
  args = p.parse_args(argv)
  measured = measured_pages(pathlib.Path(args.input).resolve())
  rows = project(measured)
  m = measured["methods"]
  result = {
      "measured": measured,
      "assumed": {
          "kv_dtype_bytes": 2, "weight_dtype_bytes": 2, "hbm_utilization": 0.9,
          "pages_per_agent_transfer": "same workload layout and recompute on the target model",
          "tensor_parallel": "weights split evenly; KV split by kv heads, replicated past them",
          "data_parallel": "each TP group is an independent engine with its own pool; this "
                           "code's data axis replicates the pool (throughput, not capacity)",
          "slo": "none: memory bound only"},
      "models": {mm.name: {**dataclasses.asdict(mm), "kv_kib_per_token_bf16":
                           mm.kv_bytes_per_token() / 1024}
                 for mm in (QWEN25_7B, QWEN25_14B)},
      "hardware": [dataclasses.asdict(h) for h in HARDWARE],
      "memory_ratio_prefix_over_tokendance": (m["prefix"]["pages_per_agent"]
                                              / m["tokendance"]["pages_per_agent"]),
      "memory_ratio_full_over_tokendance": (m["full"]["pages_per_agent"]
                                            / m["tokendance"]["pages_per_agent"]
                                            if "full" in m else None),
      "paper_ratio_vs_prefix_under_slo": PAPER_RATIO,
      "rows": rows,
  }
  pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
  pathlib.Path(args.json).write_text(json.dumps(result, indent=1))
  plot(rows, pathlib.Path(args.plot),
       f"SmolLM2, {measured['preset']}, {measured['agents']} agents")
  print("pages/agent: " + ", ".join(f"{k} {v['pages_per_agent']:.1f}" for k, v in m.items()))
  shown = [k for k in METHODS if k in m]
  print(f"{'model':12s} {'hardware':22s} chips  " + "  ".join(f"{k:>10s}" for k in shown)
        + "  td/prefix")
  for r in rows:
    ratio = f"{r['tokendance_over_prefix']:.2f}" if r["tokendance_over_prefix"] else "-"
    print(f"{r['model']:12s} {r['hardware']:22s} {r['chips']:5d}  "
          + "  ".join(f"{r[k]['max_agents']:10d}" for k in shown) + f"  {ratio}")
  print(f"wrote {args.json} and {args.plot}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
