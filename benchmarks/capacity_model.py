"""Capacity model: agents whose KV fits a data x model mesh at paper scale, per method.

Layout modelled (the page pool sharded by agent along the `data` mesh axis):
a mesh of D data replicas x TP tensor-parallel chips. Each data replica holds
its own shard of the page pool, with its own allocator; agents are placed on
shards. A shard holds the per-agent pages of its agents (private pages, and
for tokendance the mirror pages its agents' recompute forks) plus ONE replica
of every shared page its agents read: tokendance's masters, prefix caching's
cached common prefix (prefix hits happen only among agents of one shard).
Per shard (all quantities in pages of `page_size` tokens):

    pages_per_shard = floor(free HBM per chip / KV bytes of one page per chip)
    agents_per_shard = floor((pages_per_shard - fixed) / own)   (0 if it does not fit)
    max_agents(D) = D * agents_per_shard
    replicated pages = fixed * D   (fixed * (D - 1) more than one pooled pool)

with `fixed` the shared pages a shard holds once and `own` each agent's pages:
full: fixed 0, own = pages per agent. tokendance: fixed = master pages,
own = private + mirror pages. prefix: fixed = the cached prefix common to all
agents, own = the rest. "pooled" is one pool of D * pages_per_shard pages holding
`fixed` once: lost_vs_pooled = pooled - max_agents is what sharding costs (the
fixed * (D - 1) replica pages, extra_replica_agents = fixed * (D - 1) / own of
them, plus at most one agent's rounding per shard).
Today's layout (the pool replicated on every data shard) serves max_agents(1)
at any D, so `ratio_vs_data1` is also the gain over it.

Measured input: a real round (SmolLM2-135M, agent_society) from a
`tokendance bench storage` JSON (its largest agent count with both prefix and
tokendance) or a `benchmarks/round_bench.py` JSON (last round). Bytes become
pages per agent (unique pages the agents' tables reference / agents).

    python benchmarks/capacity_model.py --input docs/results/bench_storage_64.json \\
        --data 1,2,4,8 --json docs/results/capacity_model.json \\
        --plot docs/results/capacity_model.png

How fixed / own is split (stated per method in the JSON's `split`):
- round_bench JSON (stats hold mirror_pages): tokendance fixed = shared-region
  pages - mirror pages (the masters the agents reference), measured.
- storage JSON (no mirror or master page count): tokendance mirror pages per
  agent are estimated as the recompute budget over a page, recompute x shared
  tokens per agent / page_size (shared tokens = prompt tokens x (1 -
  private_share)); block selection forks whole blocks until the budget is
  covered, so this is a lower bound on mirrors and an upper bound on masters
  (the replication cost is not understated). fixed = agents x (shared-region
  pages per agent - mirror pages per agent). At 64 agents, 5%: 217 master pages
  (an upper bound; the same workload at 10% gives 247 by the same estimate and
  188 from the difference of the two runs, mirrors linear in recompute), so the
  masters lie in about 188-217 pages, which moves the agent counts by 1.5%.
- prefix, both inputs: every prefix-cache hit is on the prefix common to all
  agents (agent_society: the system prompt; the round's env block is computed
  in the same wave by every agent, so never hit), so fixed = (1 - computed
  fraction) x prompt tokens per agent / page_size (26.8 pages at 16 and 64
  agents alike) and own = pages per agent - fixed / agents.
- full: nothing shared, fixed 0.

Assumed (not measured here): pages per agent and the split carry over to
Qwen2.5-7B / 14B on the same workload (same prompt lengths, same recompute);
`own` and `fixed` held constant as agents grow past the measured count, i.e.
N agents read one shared context of `fixed` pages (agent_society's topology is
"all": every agent reads every master, so every shard holds all of them, and
an agent's pages never live on two shards); had the shared context grown with
the agents instead, fixed / n per agent would join `own` (the previous version
of this model, which charged masters per agent: 2,002 tokendance agents for
Qwen2.5-7B on one 80 GB GPU against 2,219 here); bf16 KV and weights; 90% of
HBM usable for weights + KV (vLLM's default utilization; the rest activations
and workspace); tensor parallelism within each data replica splits weights
evenly and KV by kv heads, replicating kv heads once TP exceeds them; HBM per
chip fixed as D grows; agents spread evenly over shards; memory only, no
latency SLO (the paper's 2.7x is agents under a 1500 ms round SLO on A100s).
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
DATA = (1, 2, 4, 8)  # data-parallel degrees projected
UTIL = 0.9  # of HBM usable for weights + KV


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
  chips: tuple[int, ...]  # tensor-parallel group sizes considered (per data replica)


HARDWARE = (
    Hardware("A100/H100 80GB", 80.0, (1, 2, 4, 8)),
    Hardware("TPU v5e (16 GB/chip)", 16.0, (1, 2, 4, 8)),
)
PAPER_RATIO = 2.7  # TokenDance vs vLLM prefix caching, agents under a 1500 ms SLO (A100)


# -- measured input ------------------------------------------------------------------------


def split(method: str, agents: int, page_size: int, pages: float, shared: float, *,
          prompt_tokens: float, private_share: float, computed_fraction: float,
          recompute: float, mirror: float | None = None) -> dict:
  """One method's pages per agent split into `fixed` (held once per shard) and `own`
  (per agent): pages / shared = unique / shared-region pages per agent; mirror = the
  measured mirror pages per agent where the input has them (see the module docstring)."""
  if method == "tokendance":
    if mirror is None:
      shared_tokens = prompt_tokens * (1 - private_share)
      mirror, how = (recompute * shared_tokens / page_size,
                     "estimated: mirror pages = recompute x shared tokens / page_size")
    else:
      how = "measured: masters = shared-region pages - mirror pages"
    fixed = agents * max(shared - mirror, 0.0)
  elif method == "prefix":
    fixed = (1 - computed_fraction) * prompt_tokens / page_size
    how = "estimated: common prefix = prefix-hit tokens per agent / page_size"
  else:
    fixed, how = 0.0, "nothing shared"
  fixed = min(fixed, agents * pages)
  return {"pages_per_agent": pages, "shared_region_pages_per_agent": shared,
          "fixed_pages": fixed, "own_pages_per_agent": pages - fixed / agents, "split": how}


def measured_pages(path: pathlib.Path) -> dict:
  """Pages per agent of each method, split, from a bench storage or round_bench JSON."""
  data = json.loads(path.read_text())
  src = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
  if data.get("experiment") == "storage":
    return _from_storage(data, path, src)
  run = {r["method"]: r for r in data["runs"]}
  n, ps = data["agents"], data["page_size"]
  out = {"source": src, "model": data["model"], "preset": data["preset"], "agents": n,
         "page_size": ps, "methods": {}}
  for method in METHODS:
    if method not in run:
      continue
    last, st = run[method]["rounds"][-1], run[method]["rounds"][-1]["stats"]
    page_bytes = run[method]["bytes_per_page"]
    out["methods"][method] = {
        "kv_mib_per_agent": last["kv_bytes_per_agent"] / 2**20,
        "shared_kv_mib_per_agent": last["shared_kv_bytes_per_agent"] / 2**20,
        "prompt_tokens_per_agent": st["prompt_tokens"] / n,
        **split(method, n, ps, last["kv_bytes_per_agent"] / page_bytes,
                last["shared_kv_bytes_per_agent"] / page_bytes,
                prompt_tokens=st["prompt_tokens"] / n, private_share=last["private_share"],
                computed_fraction=st["computed_fraction"],
                recompute=run[method]["config"]["recompute"],
                mirror=st["mirror_pages"] / n if "mirror_pages" in st else None)}
  return out


def _from_storage(data: dict, path: pathlib.Path, src: str) -> dict:
  """A `tokendance bench storage` result: its largest agent count with prefix and tokendance."""
  at = {(p["method"], p["agents"]): p for p in data["points"] if p["kind"] in ("run", "quality")}
  both = [n for m, n in at if m == "tokendance" and ("prefix", n) in at]
  if not both:
    raise ValueError(f"{path}: no agent count with both prefix and tokendance points")
  n, ps = max(both), data["config"]["page_size"]
  out = {"source": src, "model": data["model"], "preset": data["preset"], "agents": n,
         "page_size": ps, "recompute": data["config"]["recompute"],
         "select": data["config"]["select"], "methods": {}}
  for method in METHODS:
    p = at.get((method, n))
    if p is None:
      continue
    out["methods"][method] = {
        "kv_mib_per_agent": p["kv_bytes_per_agent"] / 2**20,
        "shared_kv_mib_per_agent": p["shared_kv_bytes_per_agent"] / 2**20,
        "prompt_tokens_per_agent": p["prompt_tokens_per_agent"],
        **split(method, n, ps, p["kv_bytes_per_agent"] / p["bytes_per_page"],
                p["shared_kv_bytes_per_agent"] / p["bytes_per_page"],
                prompt_tokens=p["prompt_tokens_per_agent"], private_share=p["private_share"],
                computed_fraction=p["computed_fraction"], recompute=p["recompute"])}
  return out


# -- projection ----------------------------------------------------------------------------


def shard_pages(model: Model, hw: Hardware, tp: int, page_size: int, util: float = UTIL) -> dict:
  """One data replica of `tp` chips: weights and free HBM per chip, one page's KV bytes per
  chip, and the pages its shard of the pool holds."""
  weights = model.params * 2 / tp  # bf16, split evenly
  free = util * hw.hbm_gib * GIB - weights
  page_bytes = page_size * model.kv_bytes_per_token() / min(tp, model.kv_heads)
  pages = max(0, math.floor(free / page_bytes)) if free > 0 else 0
  return {"tp": tp, "weights_gib_per_chip": weights / GIB, "free_gib_per_chip": free / GIB,
          "page_kib_per_chip": page_bytes / 1024, "pages_per_shard": pages}


def agents_per_shard(pages: int, fixed: float, own: float) -> int:
  """Agents one shard of `pages` pages holds: `fixed` shared pages once, `own` per agent."""
  if pages <= fixed or own <= 0:
    return 0
  return math.floor((pages - fixed) / own)


def sharded(pages: int, fixed: float, own: float, data: int, page_kib: float, tp: int) -> dict:
  """`data` shards of `pages` pages each against one pooled pool of data x pages."""
  per = agents_per_shard(pages, fixed, own)
  pooled = agents_per_shard(data * pages, fixed, own)
  return {"agents_per_shard": per, "max_agents": data * per, "pooled_max_agents": pooled,
          "lost_vs_pooled": pooled - data * per,  # the replicas, plus per-shard rounding
          "replicated_fixed_pages": fixed * data, "extra_replica_pages": fixed * (data - 1),
          "extra_replica_agents": fixed * (data - 1) / own if own > 0 else 0.0,
          "replica_gib_per_chip": fixed * page_kib / 2**20,
          "extra_replica_gib_total": fixed * (data - 1) * tp * page_kib / 2**20}


def project(measured: dict, data: tuple[int, ...] = DATA) -> list[dict]:
  """One row per (model, hardware, tp, data degree) with every measured method."""
  rows, ps = [], measured["page_size"]
  for model in (QWEN25_7B, QWEN25_14B):
    for hw in HARDWARE:
      for tp in hw.chips:
        shard = shard_pages(model, hw, tp, ps)
        pages, kib = shard["pages_per_shard"], shard["page_kib_per_chip"]
        one = {k: agents_per_shard(pages, m["fixed_pages"], m["own_pages_per_agent"])
               for k, m in measured["methods"].items()}  # data = 1
        for d in data:
          row = {"model": model.name, "hardware": hw.name, "tp": tp, "data": d,
                 "chips": tp * d, **shard}
          for method, m in measured["methods"].items():
            r = sharded(pages, m["fixed_pages"], m["own_pages_per_agent"], d, kib, tp)
            r["ratio_vs_data1"] = r["max_agents"] / one[method] if one[method] else None
            row[method] = r
          p, t = row.get("prefix", {}).get("max_agents"), row["tokendance"]["max_agents"]
          row["tokendance_over_prefix"] = t / p if p else None
          rows.append(row)
  return rows


def plot_tp(rows: list[dict], hw: str, least: int = 10) -> int:
  """The smallest TP on `hw` where every method of both models holds `least` agents a shard."""
  tps = sorted({r["tp"] for r in rows if r["hardware"] == hw})
  for tp in tps:
    if all(v["agents_per_shard"] >= least for r in rows if r["hardware"] == hw and r["tp"] == tp
           for k, v in r.items() if k in METHODS):
      return tp
  return tps[-1]


def plot(rows: list[dict], measured: dict, path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  shown = [k for k in METHODS if k in measured["methods"]]
  fig, axes = plt.subplots(2, len(HARDWARE), figsize=(6.5 * len(HARDWARE), 9), squeeze=False)
  colors = {"full": "tab:gray", "prefix": "tab:blue", "tokendance": "tab:orange"}
  for col, hw in enumerate(h.name for h in HARDWARE):
    tp = plot_tp(rows, hw)
    ax, lost = axes[0, col], axes[1, col]
    notes = []
    for model, ls in ((QWEN25_7B.name, "-"), (QWEN25_14B.name, "--")):
      sel = [r for r in rows if r["hardware"] == hw and r["model"] == model and r["tp"] == tp]
      xs = list(range(len(sel)))
      for method in shown:
        ys = [r[method]["max_agents"] for r in sel]
        ax.plot(xs, ys, ls, marker="o", color=colors[method], label=f"{model} {method}")
        last = sel[-1][method]
        if last["ratio_vs_data1"]:
          ax.annotate(f"{last['max_agents']:,} (x{last['ratio_vs_data1']:.1f} vs D=1)",
                      (xs[-1], ys[-1]), fontsize=7, textcoords="offset points", ha="right",
                      xytext=(-6, 7) if method == "tokendance" else (-6, -11))
        if method == "full":
          continue
        pct = [100 * r[method]["lost_vs_pooled"] / r[method]["pooled_max_agents"]
               if r[method]["pooled_max_agents"] else 0 for r in sel]
        lost.plot(xs, pct, ls, marker="o", color=colors[method], label=f"{model} {method}")
        f = sel[-1][method]
        notes.append(f"{model} {method}: {f['replicated_fixed_pages']:,.0f} pages "
                     f"(+{f['extra_replica_gib_total']:.2f} GiB on the mesh), "
                     f"-{f['lost_vs_pooled']:,} of {f['pooled_max_agents']:,} agents")
    labels = [str(r["data"]) for r in sel]
    ax.set(yscale="log", xlabel="data-parallel degree D (pool shards)",
           ylabel="max agents on the mesh", title=f"{hw}: TP={tp} per data replica, D x {tp} chips")
    ax.set_xticks(xs, labels)
    ax.margins(x=0.12)
    lost.set(xlabel="data-parallel degree D", ylabel="agents lost vs one pooled pool (%)",
             title=f"{hw}, TP={tp}: shared pages replicated once per shard")
    lost.set_xticks(xs, labels)
    lost.text(0.02, 0.97, f"at D={sel[-1]['data']}, shared pages held (fixed x D):\n"
              + "\n".join(notes), transform=lost.transAxes, fontsize=7, va="top",
              bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "0.8"})
    lost.set_ylim(bottom=0, top=max(lost.get_ylim()[1] * 1.8, 0.5))
  axes[0, 0].legend(fontsize=7, loc="lower right")
  axes[1, -1].legend(fontsize=7, loc="lower right")
  m = measured["methods"]
  fig.suptitle(
      f"Page pool sharded along data, from {measured['source']} ({measured['agents']} agents, "
      f"SmolLM2 pages): " + ", ".join(
          f"{k} {m[k]['fixed_pages']:.0f} shared + {m[k]['own_pages_per_agent']:.1f} per agent"
          for k in shown)
      + f"\nbf16, {UTIL:.0%} of HBM, memory only; paper: {PAPER_RATIO}x vs prefix under a "
      "1500 ms SLO", fontsize=9)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--input", default=str(ROOT / "docs/results/bench_storage_64.json"))
  p.add_argument("--data", default=",".join(map(str, DATA)),
                 help="data-parallel degrees (pool shards), comma-separated")
  p.add_argument("--json", default=str(ROOT / "docs/results/capacity_model.json"))
  p.add_argument("--plot", default=str(ROOT / "docs/results/capacity_model.png"))
  args = p.parse_args(argv)
  data = tuple(int(x) for x in args.data.split(","))
  if not data or min(data) < 1 or 1 not in data:
    p.error("--data needs positive degrees including 1 (the ratios are against it)")
  measured = measured_pages(pathlib.Path(args.input).resolve())
  rows = project(measured, data)
  m = measured["methods"]
  result = {
      "measured": measured,
      "assumed": {
          "kv_dtype_bytes": 2, "weight_dtype_bytes": 2, "hbm_utilization": UTIL,
          "pages_per_agent_transfer": "same workload layout and recompute on the target model",
          "tensor_parallel": "within each data replica: weights split evenly; KV split by kv "
                             "heads, replicated past them",
          "data_parallel": "the page pool sharded along data: each replica its own pages and "
                           "allocator; each shard holds its agents' own pages and one replica "
                           "of the shared pages (fixed_pages) they read; HBM per chip fixed",
          "growth": "own and fixed pages held constant as agents grow; every agent reads "
                    "every shared page",
          "slo": "none: memory bound only"},
      "models": {mm.name: {**dataclasses.asdict(mm), "kv_kib_per_token_bf16":
                           mm.kv_bytes_per_token() / 1024}
                 for mm in (QWEN25_7B, QWEN25_14B)},
      "hardware": [dataclasses.asdict(h) for h in HARDWARE],
      "data": list(data),
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
  plot(rows, measured, pathlib.Path(args.plot))
  shown = [k for k in METHODS if k in m]
  print("pages: " + ", ".join(f"{k} {v['fixed_pages']:.1f} shared per shard + "
                              f"{v['own_pages_per_agent']:.2f} per agent" for k, v in m.items()))
  print(f"{'model':12s} {'hardware':21s} tp  D chips  pages/shard  "
        + "  ".join(f"{k:>10s}" for k in shown) + "  td/prefix  td lost")
  for r in rows:
    ratio = f"{r['tokendance_over_prefix']:.2f}" if r["tokendance_over_prefix"] else "-"
    print(f"{r['model']:12s} {r['hardware']:21s} {r['tp']:2d} {r['data']:2d} {r['chips']:5d}"
          f"  {r['pages_per_shard']:11d}  " + "  ".join(f"{r[k]['max_agents']:10d}" for k in shown)
          + f"  {ratio:>9s}  {r['tokendance']['lost_vs_pooled']:7d}")
  print(f"wrote {args.json} and {args.plot}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
