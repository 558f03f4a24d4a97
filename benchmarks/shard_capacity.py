"""Shard capacity: how many agents fit the page pool at once as the `data` axis grows, at a
fixed number of pages per device (the pool sharded over data, one shard per device).

One process with 4 host devices (XLA_FLAGS is set here before jax starts, unless it already
names a device count) runs every method on one device (no mesh), `data=2` (the first two
devices) and `data=4`, each with `CacheConfig(num_pages=D * pages_per_device)`, the same
seeded workload and the same agent count N. "Max agents" is the size of the first wave of
the last round (`stats["wave_sizes"][0]`) of a round admitted in several waves; a last round
that ran in one wave caps the measure (">= N", `capped`). The agents' greedy outputs must be
the same token for token on every mesh (`outputs_equal`). Per shard the JSON also gives the
last round's masters (`master_pages_per_shard`), its peak pages in use (after each wave's
prefill, `pages_in_use_per_shard`) and what stays held after it. Real model (SmolLM2-135M,
debate):

    python benchmarks/shard_capacity.py --json docs/results/shard_capacity.json \\
        --plot docs/results/shard_capacity.png

Defaults: methods prefix,tokendance; data 1,2,4; N=24 agents, 2 rounds, 8 output tokens,
160 pages of 16 tokens per device; tokendance with `RoundRunConfig`'s reuse policy.
`--tiny` runs the random-weight TINY config with a stand-in tokenizer (the test's smoke run).
The issue's targets: max agents on data=4 >= 3.5x one device, and tokendance's advantage
over prefix (max agents tokendance / prefix) on data=4 at least what it is on one device.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import time
import zlib

if "jax" not in sys.modules and "device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=4").strip()

import jax  # noqa: E402

from tokendance_jax import sharding  # noqa: E402
from tokendance_jax.config import CacheConfig  # noqa: E402
from tokendance_jax.progress import bar as progress_bar  # noqa: E402
from tokendance_jax.roundrun import PromptBuilder, RoundRunConfig, make_workload, round_loop  # noqa: E402
from tokendance_jax.rounds import ReusePolicy  # noqa: E402
from tokendance_jax.session import RoundSession  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_JSON = ROOT / "docs" / "results" / "shard_capacity.json"
TARGET_RATIO = 3.5  # max agents on the largest data degree / one device


class ChunkTokenizer:
  """A stand-in tokenizer for random-weight configs: every 4 characters one id (a hash)."""

  def __init__(self, vocab_size: int, first: int = 3):
    self.vocab, self.first = vocab_size, first

  def encode(self, text: str) -> list[int]:
    span = self.vocab - self.first
    return [self.first + zlib.crc32(text[i:i + 4].encode()) % span
            for i in range(0, len(text), 4)]


def make_mesh(data: int):
  """None for one device, else a data=D mesh over the first D devices."""
  if data == 1:
    return None
  return sharding.make_mesh(f"data={data}", devices=jax.devices()[:data])


def per_shard(value, shards: int) -> list[int]:
  """A per-shard figure as a list (older stats give one number, the same on every shard)."""
  return list(value) if isinstance(value, (list, tuple)) else [int(value)] * shards


def run_one(params, cfg, tok, *, method: str, data: int, agents: int, rounds: int,
            max_tokens: int, pages_per_device: int, page_size: int, preset: str,
            seed: int = 0) -> dict:
  """One method on a data=D pool of D * pages_per_device pages: every round's outputs and
  admission, and the last round's shard figures."""
  rc = RoundRunConfig(method=method, preset=preset, agents=agents, rounds=rounds,
                      max_tokens=max_tokens, seed=seed, quality=False)
  policy = ReusePolicy(select=rc.select, recompute=rc.recompute, check_layer=rc.check_layer,
                       epic_k=rc.epic_k, tau=rc.tau, masters=rc.masters)
  cache_cfg = CacheConfig(num_pages=data * pages_per_device, page_size=page_size)
  wl = make_workload(preset, agents=agents, rounds=rounds, seed=seed, max_tokens=max_tokens)
  sess = RoundSession(params, cfg, method=method, policy=policy, cache_cfg=cache_cfg,
                      quality=False, mesh=make_mesh(data))
  alloc = sess.allocator
  used: list[list[int]] = []  # pages in use per shard after each round

  def on_round(s, _rnd, _res, _row, _t0):
    used.append([alloc.used_in(d) for d in range(alloc.shards)])

  start = time.perf_counter()
  try:
    rows = round_loop(sess, PromptBuilder(wl, tok), rounds, on_round=on_round)
  finally:
    sess.close()
  seconds = time.perf_counter() - start
  last = rows[-1]["stats"]
  waves = [r["stats"]["wave_sizes"] for r in rows]
  capped = len(waves[-1]) == 1
  return {
      "method": method, "data": data, "mesh": f"data={data}" if data > 1 else None,
      "agents": agents, "max_agents": waves[-1][0], "capped": capped,
      "wave_sizes": waves, "preemptions": last["preemptions"],
      "pages_per_device": pages_per_device, "page_size": page_size,
      "pool_shards": alloc.shards, "pages_per_shard": alloc.pages_per_shard,
      "pages_sharded": bool(last.get("pages_sharded", data == 1)),
      "master_pages": last["master_pages"],
      "master_pages_per_shard": per_shard(last.get("master_pages_per_shard",
                                                   last["master_pages"]), alloc.shards),
      # the last round's peak per shard (after each wave's prefill), then what stays held
      "pages_in_use_per_shard": list(last.get("pages_in_use_per_shard") or (
          [rows[-1]["pages_in_use"]] if alloc.shards == 1 else used[-1])),
      "pages_held_per_shard_after_round": used[-1],
      "peak_pages_in_use": max(r["pages_in_use"] for r in rows),
      "kv_pool_bytes_per_device": last.get(
          "kv_pool_bytes_per_device", cache_cfg.num_pages * cache_cfg.bytes_per_page(cfg)),
      "prompt_tokens": [r["stats"]["prompt_tokens"] for r in rows],
      "leaked_pages": alloc.num_used, "seconds": round(seconds, 2),
      "outputs": [r["outputs"] for r in rows]}


def compare_outputs(ref: list[dict], got: list[dict]) -> dict:
  """Token-for-token comparison of two runs' per-round {agent: ids}."""
  diff = [(r, a) for r, (x, y) in enumerate(zip(ref, got, strict=True))
          for a in sorted(set(x) | set(y)) if x.get(a) != y.get(a)]
  return {"equal": not diff, "agents_differing": len(diff),
          "first_difference": None if not diff else {"round": diff[0][0], "agent": diff[0][1]}}


def summarize(runs: list[dict], methods: list[str], datas: list[int]) -> dict:
  """Ratios vs one device (the smallest data degree), tokendance / prefix, equality, targets."""
  by = {(r["method"], r["data"]): r for r in runs}
  base_d, top_d = min(datas), max(datas)
  for r in runs:
    base = by[(r["method"], base_d)]
    r["ratio_vs_data1"] = r["max_agents"] / base["max_agents"]
    # a capped numerator makes the ratio a lower bound, a capped base makes it meaningless
    r["ratio_bound"] = "unknown" if base["capped"] and r["data"] != base_d else \
        "lower" if r["capped"] else "exact"
    eq = compare_outputs(base["outputs"], r["outputs"])
    r["outputs_equal"], r["outputs_check"] = eq["equal"], eq
  advantage = {}
  if "prefix" in methods and "tokendance" in methods:
    for d in datas:
      td, pf = by[("tokendance", d)], by[("prefix", d)]
      advantage[str(d)] = {"tokendance_over_prefix": td["max_agents"] / pf["max_agents"],
                           "capped": td["capped"] or pf["capped"]}
  targets = {}
  for m in methods:
    top = by[(m, top_d)]
    ok = top["ratio_vs_data1"] >= TARGET_RATIO
    state = "met" if ok and top["ratio_bound"] != "unknown" else \
        "missed" if not ok and top["ratio_bound"] == "exact" else "undetermined (capped)"
    targets[f"{m}_data{top_d}_ratio_ge_{TARGET_RATIO}"] = {
        "ratio": top["ratio_vs_data1"], "bound": top["ratio_bound"], "state": state}
  if advantage:
    lo, hi = advantage[str(base_d)], advantage[str(top_d)]
    ok = hi["tokendance_over_prefix"] >= lo["tokendance_over_prefix"]
    targets[f"advantage_data{top_d}_ge_data{base_d}"] = {
        "data1": lo["tokendance_over_prefix"], f"data{top_d}": hi["tokendance_over_prefix"],
        "state": ("met" if ok else "missed") if not (lo["capped"] or hi["capped"])
        else "undetermined (capped)"}
  outputs_equal = {m: all(by[(m, d)]["outputs_equal"] for d in datas) for m in methods}
  return {"advantage": advantage, "targets": targets, "outputs_equal": outputs_equal}


def measure(params, cfg, tok, *, methods=("prefix", "tokendance"), datas=(1, 2, 4),
            agents: int = 16, rounds: int = 2, max_tokens: int = 8,
            pages_per_device: int = 160, page_size: int = 16, preset: str = "debate",
            progress: bool = True, log=print) -> dict:
  """Every (method, data degree) run, then the summary; the JSON-ready result."""
  methods, datas = list(methods), sorted(datas)
  if max(datas) > len(jax.devices()):
    raise ValueError(f"data={max(datas)} needs {max(datas)} devices; {len(jax.devices())} "
                     "available (XLA_FLAGS=--xla_force_host_platform_device_count=N)")
  runs = []
  bar = progress_bar(len(methods) * len(datas), enabled=progress, unit="run", desc="runs",
                     leave=True)
  try:
    for method in methods:
      for d in datas:
        r = run_one(params, cfg, tok, method=method, data=d, agents=agents, rounds=rounds,
                    max_tokens=max_tokens, pages_per_device=pages_per_device,
                    page_size=page_size, preset=preset)
        runs.append(r)
        bar.update(1)
        log(f"[shard_capacity] {method:10s} data={d}: max agents "
            f"{'>=' if r['capped'] else ''}{r['max_agents']} of {agents} "
            f"(waves {[len(w) for w in r['wave_sizes']]}, last {r['wave_sizes'][-1]}), "
            f"masters/shard {r['master_pages_per_shard']}, in use/shard "
            f"{r['pages_in_use_per_shard']}, {r['seconds']:.0f} s")
  finally:
    bar.close()
  summary = summarize(runs, methods, datas)
  return {"workload": {"preset": preset, "agents": agents, "rounds": rounds,
                       "max_tokens": max_tokens, "pages_per_device": pages_per_device,
                       "page_size": page_size, "methods": methods, "data": datas,
                       "devices": len(jax.devices()), "platform": jax.devices()[0].platform},
          "runs": runs, **summary}


def table(result: dict) -> str:
  """A plain-text table of the runs, then the advantage and the targets."""
  head = (f"{'method':10s} {'data':>4s} {'max':>5s} {'ratio':>6s} {'pages/dev':>9s} "
          f"{'masters/shard':>14s} {'peak in use/shard':>18s} {'waves':>9s} {'equal':>5s} "
          f"{'s':>5s}")
  lines = [head]
  for r in result["runs"]:
    mx = (">=" if r["capped"] else "") + str(r["max_agents"])
    ratio = ("" if r["ratio_bound"] == "exact" else ">=" if r["ratio_bound"] == "lower"
             else "?") + f"{r['ratio_vs_data1']:.2f}"
    lines.append(f"{r['method']:10s} {r['data']:4d} {mx:>5s} {ratio:>6s} "
                 f"{r['pages_per_device']:9d} {str(r['master_pages_per_shard']):>14s} "
                 f"{str(r['pages_in_use_per_shard']):>18s} "
                 f"{str([len(w) for w in r['wave_sizes']]):>9s} {str(r['outputs_equal']):>5s} "
                 f"{r['seconds']:5.0f}")
  for d, a in result["advantage"].items():
    lines.append(f"tokendance / prefix at data={d}: {a['tokendance_over_prefix']:.2f}"
                 + (" (capped)" if a["capped"] else ""))
  for name, t in result["targets"].items():
    lines.append(f"target {name}: {t['state'].upper()} ({json.dumps(t)})")
  lines.append(f"outputs equal across meshes: {result['outputs_equal']}")
  return "\n".join(lines)


def plot(result: dict, path: pathlib.Path) -> None:
  """Max agents vs data degree, one line per method (hollow markers: capped, >= value),
  with each method's linear scaling from one device dashed."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  wl = result["workload"]
  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  top = {}  # per data degree, the most agents any method fits: its label goes above
  for r in result["runs"]:
    top[r["data"]] = max(top.get(r["data"], 0), r["max_agents"])
  for k, m in enumerate(wl["methods"]):
    runs = sorted((r for r in result["runs"] if r["method"] == m), key=lambda r: r["data"])
    xs, ys = [r["data"] for r in runs], [r["max_agents"] for r in runs]
    color = f"C{k}"
    ax.plot(xs, ys, "-", color=color, label=m)
    for r in runs:
      ax.plot(r["data"], r["max_agents"], "o", color=color,
              markerfacecolor="white" if r["capped"] else color)
      ax.annotate(("≥" if r["capped"] else "") + str(r["max_agents"]), (r["data"], r["max_agents"]),
                  textcoords="offset points", color=color,
                  xytext=(6, 4 if r["max_agents"] == top[r["data"]] else -12))
    ax.plot(xs, [ys[0] * x / xs[0] for x in xs], ":", color=color, alpha=0.6,
            label=f"{m}, linear from {xs[0]} device")
  ax.axhline(wl["agents"], color="grey", lw=0.8, ls="--", label=f"N = {wl['agents']} agents run")
  ax.set_xticks(wl["data"])
  ax.set_xlabel("data degree D (pool shards, one device each)")
  ax.set_ylabel("max agents in one wave (last round)")
  ax.set_title(f"{wl['preset']}, {wl['pages_per_device']} pages x {wl['page_size']} tokens per "
               f"device, {wl['max_tokens']} output tokens", fontsize=10)
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def load(tiny: bool):
  """(params, cfg, tokenizer): SmolLM2-135M, or TINY with random weights and no EOS."""
  if tiny:
    from tokendance_jax import model
    from tokendance_jax.config import TINY

    cfg = dataclasses.replace(TINY, eos_ids=())  # every agent decodes max_tokens
    return model.init_params(cfg, jax.random.PRNGKey(0)), cfg, ChunkTokenizer(cfg.vocab_size)
  from tokendance_jax import api

  return api.load_model(progress=False)


def library_state() -> dict:
  """The git commit run, and whether tokendance_jax/ had uncommitted edits."""
  import subprocess

  def git(*a):
    done = subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None

  dirty = git("status", "--porcelain", "--", "tokendance_jax")
  return {"commit": git("rev-parse", "HEAD"),
          "tokendance_jax_dirty": None if dirty is None else bool(dirty)}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--methods", default="prefix,tokendance", help="comma-separated")
  p.add_argument("--data", default="1,2,4", help="data degrees, comma-separated (1: no mesh)")
  p.add_argument("--agents", type=int, default=24, help="N; must exceed what data=4 holds")
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--max-tokens", type=int, default=8)
  p.add_argument("--pages-per-device", type=int, default=160)
  p.add_argument("--page-size", type=int, default=16)
  p.add_argument("--preset", default="debate")
  p.add_argument("--tiny", action="store_true", help="random-weight TINY (smoke test)")
  p.add_argument("--json", default=str(DEFAULT_JSON))
  p.add_argument("--plot", default=None, help="default: the JSON's path with .png")
  p.add_argument("--no-progress", action="store_true")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  library = library_state()  # before the runs: the tree they import
  params, cfg, tok = load(args.tiny)
  result = measure(params, cfg, tok, methods=args.methods.split(","),
                   datas=[int(d) for d in args.data.split(",")], agents=args.agents,
                   rounds=args.rounds, max_tokens=args.max_tokens,
                   pages_per_device=args.pages_per_device, page_size=args.page_size,
                   preset=args.preset, progress=not args.no_progress)
  result["model"] = "TINY (random weights)" if args.tiny else "SmolLM2-135M"
  result["command"] = "python benchmarks/shard_capacity.py " + " ".join(
      argv if argv is not None else sys.argv[1:])
  result["library"] = library
  path = pathlib.Path(args.json)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(result, indent=1))
  plot(result, pathlib.Path(args.plot) if args.plot else path.with_suffix(".png"))
  print(table(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
