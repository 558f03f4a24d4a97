"""The `tokendance bench` plot: one figure of three panels per experiment (storage, prefill,
capacity, sweep), drawn from the JSON result alone (matplotlib, Agg backend)."""

from __future__ import annotations

import pathlib

import numpy as np

from tokendance_jax.eval.config import TARGETS


def plot(result: dict, path: str) -> None:
  """Write the figure of a `tokendance bench` result (any experiment) to `path` (PNG)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
  fig, axes = plt.subplots(1, 3, figsize=(14, 4))
  {"storage": _plot_storage, "prefill": _plot_prefill, "capacity": _plot_capacity,
   "sweep": _plot_sweep}[result["experiment"]](result, axes)
  c = result["config"]
  reuse = (f"select {c['select']} r={c['recompute']}" if result["experiment"] != "sweep" else
           f"selects {','.join(c['selects'])}, r in {','.join(f'{f:g}' for f in c['fractions'])}"
           + (f", tau in {','.join(f'{t:g}' for t in c['taus'])} (cap {c['recompute']:g})"
              if c.get("taus") else ""))
  reuse += f", masters {','.join(c['masters'])}" if c.get("masters") else ""
  order = f", order {c['order']}" if c.get("order") else ""
  fig.suptitle(f"{result['model']}: {result['experiment']}, {c['preset']}, {c['rounds']} rounds, "
               f"{reuse}{order} ({result['backend']})")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _series(points, key, kinds=("run", "reference", "quality")):
  by = {}
  for p in points:
    if p["kind"] in kinds and key in p:
      by.setdefault(p["method"], []).append((p["agents"], p[key]))
  return {m: sorted(v) for m, v in by.items()}


def _agents_axis(ax, agents) -> None:
  ax.set_xscale("log", base=2)
  ax.set_xticks(sorted(set(agents)), [str(n) for n in sorted(set(agents))])
  ax.minorticks_off()
  ax.set_xlabel("agents")


def _ratio_axis(ax, result, names):
  xs = []
  for name in names:
    r = result["ratios"][name]
    table = r.get("by_agents") or {}
    if table:
      x = sorted(int(k) for k in table)
      xs += x
      line, = ax.plot(x, [table[str(k)] for k in x], "o-", label=name)
      if r["target"] is not None:
        ax.axhline(r["target"], ls="--", lw=1, color=line.get_color())
  if xs:
    _agents_axis(ax, xs)
  ax.set_title("ratio (dashed: its target)")
  ax.legend(fontsize=7)


def _plot_storage(result, axes):
  panels = ((axes[0], "kv_bytes_per_agent", "KV per agent (MiB)"),
            (axes[1], "shared_kv_bytes_per_agent", "shared-region KV per agent (MiB)"))
  for ax, key, title in panels:
    for m, xy in _series(result["points"], key).items():
      ax.plot([x for x, _ in xy], [y / 2**20 for _, y in xy], "o-", label=m)
    _agents_axis(ax, [p["agents"] for p in result["points"]])
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.legend(fontsize=7)
  _ratio_axis(axes[2], result, ("shared_kv_vs_prefix", "whole_kv_vs_prefix"))


def _plot_prefill(result, axes):
  for m, xy in _series(result["points"], "prefill_seconds_net").items():
    axes[0].plot([x for x, _ in xy], [y for _, y in xy], "o-", label=m)
  _agents_axis(axes[0], [p["agents"] for p in result["points"]])
  axes[0].set_title("prefill seconds per round (no compile)")
  axes[0].legend(fontsize=7)
  pts = [p for p in result["points"] if p["kind"] in ("run", "quality") and p["method"] != "full"]
  pts.sort(key=lambda p: (p["agents"], p["method"]))
  names = [f"{p['method'][:5]}\n{p['agents']}" for p in pts]
  bottom = np.zeros(len(pts))
  for part in ("check_seconds", "recompute_seconds", "copy_seconds", "master_prefill_seconds",
               "other_seconds"):
    vals = np.array([p[part] for p in pts])
    axes[1].bar(names, vals, bottom=bottom, label=part.rsplit("_", 1)[0])
    bottom += vals
  axes[1].set_title("prefill breakdown (s, parts include compile)")
  axes[1].tick_params(axis="x", labelsize=6)
  axes[1].legend(fontsize=7)
  _ratio_axis(axes[2], result, ("prefill_vs_cacheblend", "prefill_vs_epic"))


def _plot_capacity(result, axes):
  trials = [p for p in result["points"] if p["kind"] == "trial"]
  for m in sorted({p["method"] for p in trials}):
    ts = [p for p in trials if p["method"] == m and "max_round_seconds_net" in p]
    ok = [p for p in ts if p["fits"]]
    line, = axes[0].plot([p["agents"] for p in ok], [p["max_round_seconds_net"] for p in ok], "o",
                         label=f"{m}: fits")
    bad = [p for p in ts if not p["fits"]]
    axes[0].plot([p["agents"] for p in bad], [p["max_round_seconds_net"] for p in bad], "o",
                 mfc="none", color=line.get_color(), label=f"{m}: preempted / slow")
    oop = [p["agents"] for p in trials if p["method"] == m and "max_round_seconds_net" not in p]
    axes[0].plot(oop, [0] * len(oop), "x", color=line.get_color(), label=f"{m}: out of pages")
  axes[0].axhline(result["slo_seconds"], ls="--", color="gray", label="SLO")
  axes[0].set_xlabel("agents")
  axes[0].set_title("slowest round (s, no compile)")
  axes[0].legend(fontsize=7)
  cap = result["capacity"]
  axes[1].bar(list(cap), [c["agents"] for c in cap.values()])
  axes[1].set_title(f"agents under SLO, {result['num_pages']} pages")
  for m, xy in _series(trials, "kv_bytes_per_agent", kinds=("trial",)).items():
    axes[2].plot([x for x, _ in xy], [y / 2**20 for _, y in xy], "o-", label=m)
  axes[2].set_xlabel("agents")
  axes[2].set_title("KV per agent (MiB) in the trials")
  axes[2].legend(fontsize=7)


def _recomputed_share(p: dict) -> float:
  """Mean share of its shared tokens an agent recomputed (the setting where unmeasured)."""
  by_agent = p.get("shared_recomputed_by_agent")
  return by_agent["mean"] if by_agent else p["recompute"]


def _plot_sweep(result, axes):
  pts = [p for p in result["points"] if p["kind"] == "sweep"]
  mode = lambda p: "fraction" if p.get("tau") is None else "tau"  # noqa: E731
  groups = sorted({(p["method"], p["select"], p["agents"], mode(p)) for p in pts})
  for m, sel, n, md in groups:
    g = sorted((p for p in pts if (p["method"], p["select"], p["agents"], mode(p))
                == (m, sel, n, md)), key=_recomputed_share)
    label = f"{m} {sel}" + (" tau" if md == "tau" else "") + f", {n} agents"
    xs = [_recomputed_share(p) for p in g]
    axes[0].plot(xs, [p["forced_top1"] for p in g], "o-", label=label)
    axes[1].plot(xs, [max(p.get("mean_kl", 0.0), 1e-9) for p in g], "o-", label=label)
    line, = axes[2].plot(xs, [p["shared_kv_vs_prefix"] for p in g], "o-", label=f"{label}: shared")
    axes[2].plot(xs, [p["whole_kv_vs_prefix"] for p in g], "s--", color=line.get_color(),
                 label=f"{label}: whole")
  axes[0].axhline(TARGETS["top1_vs_full"][0], ls="--", color="gray", label="quality bar")
  axes[0].set_title("forced top-1 vs full (every output token)")
  axes[1].set_yscale("log")
  axes[1].set_title("mean next-token KL vs full")
  axes[2].set_title("KV per agent: prefix / tokendance")
  for ax in axes:
    ax.set_xlabel("shared tokens recomputed (mean over agents)")
    ax.legend(fontsize=7)
