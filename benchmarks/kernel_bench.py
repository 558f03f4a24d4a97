"""Benchmark the paged attention kernels against XLA's jnp paths.

Shapes (`--shapes`): SmolLM2-135M's attention (9 query / 3 KV heads of 64,
RoPE theta 1e5) or Qwen2.5-7B's (28 query / 4 KV heads of 128, theta 1e6),
over a page pool of 16-token pages with shuffled block tables. Workloads:

  decode   batch B, every sequence at context C (one query each).
  prefill  T tokens of full, ragged prefill split over several sequences.

On GPU the kernels (interpret=False, block sizes from `kernels.tuning` for
the device kind, plus a few `--variants`), the jnp reference (XLA's fused
path, the GPU default) and, for prefill, the chunked jnp path are timed; the
JSON's `summary` holds kernel / best-XLA speedups and the issue's targets.
On CPU only the jnp paths are timed; the Pallas kernel runs once in
interpret mode at a tiny size as a correctness check, which is not a timing.

Each point records median milliseconds over several repeats (after warmup,
with block_until_ready), derived K/V bandwidth (bytes of K and V the queries
attend to, read once, / time) and FLOP/s (4 * heads * head_dim per visible
query-key pair: QK^T plus PV, RoPE not counted), and the max |kernel -
reference| where the kernel ran.

  python benchmarks/kernel_bench.py --quick --json /tmp/kb.json --plot /tmp/kb.png
  python benchmarks/kernel_bench.py --shapes qwen7b --json kb_qwen.json --plot kb_qwen.png
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import shapes as model_shapes  # benchmarks/shapes.py

from tokendance_jax import kernels

PAGE_SIZE = 16
DECODE_BATCHES = (1, 16, 64)
DECODE_CONTEXTS = (512, 2048, 4096)
PREFILL_TOKENS = (1024, 4096, 8192)
QUICK_DECODE_BATCHES = (1, 8)
QUICK_DECODE_CONTEXTS = (512, 1024)
QUICK_PREFILL_TOKENS = (512, 1024)
PREFILL_SPLIT = (0.4, 0.3, 0.2, 0.1)  # share of the tokens in each prefill sequence
# Kernel variants timed beside the tuned one (GPU, --variants): name -> changes to the
# DeviceTuning (prefill_rows) or to its BlockSizes (the rest).
VARIANTS = {"decode": {"no_split": dict(num_splits=1), "rows16": dict(min_rows=16)},
            "prefill": {"rows128": dict(prefill_rows=128), "rows16": dict(min_rows=16)}}

# Max |kernel - reference| accepted per dtype (the kernel rounds rotated q/k
# and softmax weights to the pool dtype; the reference stays float32).
TOLERANCE = {"float32": 1e-4, "bfloat16": 6e-2}


def make_pool(rng, lengths, dtype, shape):
  """Random pre-RoPE K/V pool holding `lengths` tokens, shuffled pages.

  Returns k_pages, v_pages [KV, P, ps, D] and block_tables [S, pps] int32.
  """
  blocks = [-(-n // PAGE_SIZE) for n in lengths]
  num_pages = 1 + sum(blocks)  # page 0 is the null page
  perm = rng.permutation(np.arange(1, num_pages)).astype(np.int32)
  tables = np.zeros((len(lengths), max(blocks)), np.int32)
  start = 0
  for s, b in enumerate(blocks):
    tables[s, :b] = perm[start:start + b]
    start += b
  pool = kernels.kv_cache_shape(num_pages, PAGE_SIZE, shape.kv_heads, shape.head_dim)
  k = jnp.asarray(rng.standard_normal(pool, np.float32), dtype)
  v = jnp.asarray(rng.standard_normal(pool, np.float32), dtype)
  return k, v, jnp.asarray(tables)


def decode_inputs(rng, batch, ctx, dtype, shape):
  k, v, tables = make_pool(rng, [ctx] * batch, dtype, shape)
  q = jnp.asarray(rng.standard_normal((batch, shape.n_heads, shape.head_dim), np.float32), dtype)
  positions = jnp.full((batch,), ctx - 1, jnp.int32)
  visible = batch * ctx  # query-key pairs
  return (q, k, v, tables, positions), visible, visible


def prefill_lengths(total):
  lengths = [max(1, int(total * f)) for f in PREFILL_SPLIT]
  lengths[0] += total - sum(lengths)
  return lengths


def prefill_inputs(rng, total, dtype, shape):
  lengths = prefill_lengths(total)
  k, v, tables = make_pool(rng, lengths, dtype, shape)
  positions = np.concatenate([np.arange(n) for n in lengths]).astype(np.int32)
  seq_ids = np.concatenate([np.full(n, s) for s, n in enumerate(lengths)]).astype(np.int32)
  q = jnp.asarray(rng.standard_normal((total, shape.n_heads, shape.head_dim), np.float32), dtype)
  pairs = sum(n * (n + 1) // 2 for n in lengths)  # causal query-key pairs
  kv_tokens = sum(lengths)  # each key read (at least) once
  return (q, k, v, tables, jnp.asarray(positions), jnp.asarray(seq_ids)), pairs, kv_tokens


def time_ms(fn, repeats, warmup=2):
  """(median ms, first-call s) of fn() with block_until_ready."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - t0
  for _ in range(warmup - 1):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append((time.perf_counter() - t0) * 1e3)
  return statistics.median(times), first


def max_err(a, b):
  return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))


def kernel_block_sizes(kind, device_tuning, shape, variant=None):
  """The tuned BlockSizes for this workload, or a named variant of them."""
  changes = dict(VARIANTS[kind][variant]) if variant else {}
  if "prefill_rows" in changes:
    device_tuning = dataclasses.replace(device_tuning, prefill_rows=changes.pop("prefill_rows"))
  bs = device_tuning.block_sizes(decode=kind == "decode", group=shape.n_heads // shape.kv_heads)
  return dataclasses.replace(bs, **changes)


def run_point(kind, size, rng, dtype, args_ns, on_gpu, device_tuning, shape):
  """Time one (workload, size) point -> dict for the JSON."""
  if kind == "decode":
    batch, ctx = size
    args, pairs, kv_tokens = decode_inputs(rng, batch, ctx, dtype, shape)
    kernel, reference = kernels.paged_decode_attention, kernels.paged_decode_attention_reference
    chunked = None
    point = {"kind": kind, "batch": batch, "ctx": ctx}
  else:
    args, pairs, kv_tokens = prefill_inputs(rng, size, dtype, shape)
    kernel, reference = kernels.ragged_paged_attention, kernels.ragged_paged_attention_reference
    chunked = kernels.ragged_paged_attention_chunked
    point = {"kind": kind, "tokens": size, "lengths": prefill_lengths(size)}
  itemsize = jnp.dtype(dtype).itemsize
  kv_bytes = 2 * kv_tokens * shape.kv_heads * shape.head_dim * itemsize  # K and V
  flops = 4 * pairs * shape.n_heads * shape.head_dim
  point.update(kv_bytes=kv_bytes, flops=flops)
  theta = shape.rope_theta

  impls = {"reference": lambda: reference(*args, rope_theta=theta)}
  if chunked is not None and (on_gpu or args_ns.quick):
    impls["chunked"] = lambda: chunked(*args, rope_theta=theta)
  if on_gpu:
    for variant in [None, *(VARIANTS[kind] if args_ns.variants else ())]:
      bs = kernel_block_sizes(kind, device_tuning, shape, variant)
      name = "kernel" if variant is None else f"kernel_{variant}"
      impls[name] = (lambda bs=bs: kernel(*args, rope_theta=theta, block_sizes=bs,
                                          interpret=False))
      point[f"{name}_block_sizes"] = dataclasses.asdict(bs)
  outs = {}
  for name, fn in impls.items():
    try:
      ms, first = time_ms(fn, args_ns.repeats)
    except Exception as e:  # e.g. a lowering failure: keep the other points
      if name == "reference":
        raise
      point[f"{name}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
      point.update({f"{name}_{m}": None for m in ("ms", "first_call_s", "gbps", "tflops")})
      continue
    outs[name] = fn()
    point[f"{name}_ms"] = ms
    point[f"{name}_first_call_s"] = first
    point[f"{name}_gbps"] = kv_bytes / ms / 1e6
    point[f"{name}_tflops"] = flops / ms / 1e9
  errs = {n: max_err(o, outs["reference"]) for n, o in outs.items() if n.startswith("kernel")}
  if "kernel" in outs:
    point["max_abs_err"] = errs["kernel"]
    point["max_abs_err_variants"] = errs
    point["err_ok"] = max(errs.values()) <= TOLERANCE[jnp.dtype(dtype).name]
  else:  # not run here (CPU: interpret mode is not timed), or it failed
    point["max_abs_err"] = None
    if "kernel" in impls:
      point["err_ok"] = False
  xla = [point[f"{n}_ms"] for n in ("reference", "chunked") if point.get(f"{n}_ms")]
  point["xla_best_ms"] = min(xla)
  point["kernel_speedup"] = (point["xla_best_ms"] / point["kernel_ms"]
                             if point.get("kernel_ms") else None)
  return point


def interpret_check(rng, dtype, shape):
  """Both kernels once in interpret mode at a tiny size vs their references (not a timing)."""
  results = []
  block_sizes = kernels.BlockSizes(block_q=16, pages_per_block=4, num_splits=2)
  decode_args, _, _ = decode_inputs(rng, 2, 40, dtype, shape)
  for kind, args, kernel, reference in [
      ("decode", decode_args, kernels.paged_decode_attention,
       kernels.paged_decode_attention_reference),
      ("prefill", prefill_inputs(rng, 48, dtype, shape)[0], kernels.ragged_paged_attention,
       kernels.ragged_paged_attention_reference)]:
    t0 = time.perf_counter()
    out = kernel(*args, rope_theta=shape.rope_theta, block_sizes=block_sizes, interpret=True)
    wall = time.perf_counter() - t0
    err = max_err(out, reference(*args, rope_theta=shape.rope_theta))
    results.append({"kind": kind, "q_shape": list(args[0].shape), "max_abs_err": err,
                    "err_ok": err <= TOLERANCE[jnp.dtype(dtype).name],
                    "wall_s_including_compile": wall,
                    "note": "interpret mode on CPU: a correctness check, not a timing"})
  return results


def summarize(points, shape, device_kind):
  """Kernel vs XLA per point and the issue's GPU targets (None where not measured here)."""
  timed = [p for p in points if p.get("kernel_ms")]
  peak = model_shapes.hbm_peak(device_kind)
  decode = [p for p in timed if p["kind"] == "decode"]
  big = [p for p in decode if p["batch"] >= 16 and p["ctx"] >= 2048]
  prefill_8k = [p for p in timed if p["kind"] == "prefill" and p["tokens"] >= 8192]
  out = {
      "kernel_timed": bool(timed),
      "kernel_faster_everywhere": bool(timed) and all(p["kernel_speedup"] > 1 for p in timed),
      "min_speedup": min((p["kernel_speedup"] for p in timed), default=None),
      "hbm_peak_gbps_datasheet": peak,
  }
  if big and peak:
    out["decode_min_hbm_fraction_b16_ctx2k"] = min(p["kernel_gbps"] for p in big) / peak
    out["target_decode_40pct_hbm"] = out["decode_min_hbm_fraction_b16_ctx2k"] >= 0.4
  if decode:
    out["target_decode_2x_xla"] = all(p["kernel_speedup"] >= 2 for p in decode)
  if prefill_8k and shape.head_dim == 128:
    out["prefill_tflops_8k"] = max(p["kernel_tflops"] for p in prefill_8k)
    out["target_prefill_150_tflops"] = out["prefill_tflops_8k"] >= 150
  return out


def plot(result, path):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.ticker import NullLocator

  points = result["points"]
  impls = [i for i in ("kernel", "reference", "chunked") if any(p.get(f"{i}_ms") for p in points)]
  styles = {"kernel": "-", "reference": "--", "chunked": ":"}
  fig, axes = plt.subplots(2, 2, figsize=(11, 8))
  decode = [p for p in points if p["kind"] == "decode"]
  for col, (metric, label) in enumerate([("ms", "median ms"), ("gbps", "K/V GB/s")]):
    ax = axes[0, col]
    for color, batch in enumerate(sorted({p["batch"] for p in decode})):
      rows = [p for p in decode if p["batch"] == batch]
      for impl in impls:  # one color per batch; solid kernel, dashed reference
        if impl == "chunked":
          continue
        ax.plot([p["ctx"] for p in rows], [p.get(f"{impl}_{metric}") for p in rows],
                styles[impl], color=f"C{color}", marker="o", label=f"{impl} B={batch}")
    ax.set(xscale="log", yscale="log", xlabel="context tokens", ylabel=label,
           title=f"decode: {label}")
    ctxs = sorted({p["ctx"] for p in decode})
    ax.set_xticks(ctxs, [str(c) for c in ctxs])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.legend(fontsize=7)
  prefill = [p for p in points if p["kind"] == "prefill"]
  for col, (metric, label) in enumerate([("ms", "median ms"), ("tflops", "TFLOP/s")]):
    ax = axes[1, col]
    for impl in impls:
      ax.plot([p["tokens"] for p in prefill], [p.get(f"{impl}_{metric}") for p in prefill],
              styles[impl], marker="o", label=impl)
    ax.set(xscale="log", yscale="log", xlabel="total prefill tokens", ylabel=label,
           title=f"ragged prefill ({len(PREFILL_SPLIT)} seqs): {label}")
    ax.set_xticks([p["tokens"] for p in prefill], [str(p["tokens"]) for p in prefill])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.legend(fontsize=7)
  dev, c = result["device"], result["config"]
  fig.suptitle(f"paged attention, {c['n_heads']}q/{c['kv_heads']}kv heads x {c['head_dim']}, "
               f"page {PAGE_SIZE}, {c['dtype']} on {dev['platform']} ({dev['device_kind']})"
               + ("" if "kernel" in impls else " - jnp only (kernel not timed on CPU)"))
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--json", metavar="OUT", help="write every point here")
  parser.add_argument("--plot", metavar="PNG", help="write a matplotlib figure here")
  parser.add_argument("--quick", action="store_true", help="few small points (CPU, < 1 min)")
  parser.add_argument("--smoke", action="store_true",
                      help="one decode and one prefill point (gpu_check.sh --quick on CPU)")
  parser.add_argument("--shapes", choices=sorted(model_shapes.MODELS), default="smollm2")
  parser.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                      help="pool/query dtype (default: bfloat16 on GPU, float32 on CPU)")
  parser.add_argument("--repeats", type=int, default=None, help="timed runs per point")
  parser.add_argument("--variants", action="store_true",
                      help="also time kernel variants (no split, 16-row minimum, 128-row tiles)")
  parser.add_argument("--budget-s", type=float, default=None,
                      help="skip the remaining points once this many seconds have passed")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)

  backend = jax.default_backend()
  on_gpu = backend == "gpu"
  shape = model_shapes.attention_shape(args.shapes)
  device_kind = jax.devices()[0].device_kind
  device_tuning = kernels.tuning.for_device(device_kind)
  dtype = jnp.dtype(args.dtype or ("bfloat16" if on_gpu else "float32"))
  args.repeats = args.repeats or (5 if args.quick else 20)
  args.quick = args.quick or args.smoke
  batches = QUICK_DECODE_BATCHES if args.quick else DECODE_BATCHES
  contexts = QUICK_DECODE_CONTEXTS if args.quick else DECODE_CONTEXTS
  prefill_sizes = QUICK_PREFILL_TOKENS if args.quick else PREFILL_TOKENS
  if args.smoke:
    batches, contexts, prefill_sizes = batches[-1:], contexts[:1], prefill_sizes[:1]
  rng = np.random.default_rng(args.seed)
  start = time.perf_counter()

  result = {
      "device": {"platform": backend, "device_kind": device_kind,
                 "jax_version": jax.__version__, "python": platform.python_version()},
      "config": {"shapes": shape.name, "n_heads": shape.n_heads, "kv_heads": shape.kv_heads,
                 "head_dim": shape.head_dim, "page_size": PAGE_SIZE,
                 "rope_theta": shape.rope_theta, "dtype": dtype.name,
                 "tuning": dataclasses.asdict(device_tuning), "repeats": args.repeats,
                 "quick": args.quick, "kernel_timed": on_gpu,
                 "lowering": kernels.lowering.LOWERING, "tolerance": TOLERANCE[dtype.name],
                 "bandwidth_note": "kv_bytes counts each visible K/V entry once",
                 "flops_note": "4 * heads * head_dim per visible (query, key) pair"},
      "points": [], "skipped": [],
  }
  sizes = [("decode", (b, c)) for b in batches for c in contexts]
  sizes += [("prefill", t) for t in prefill_sizes]
  for kind, size in sizes:
    if args.budget_s and time.perf_counter() - start > args.budget_s:
      result["skipped"].append({"kind": kind, "size": size, "why": "time budget"})
      continue
    point = run_point(kind, size, rng, dtype, args, on_gpu, device_tuning, shape)
    result["points"].append(point)
    if args.json:  # after every point: a run stopped at its time limit keeps what it measured
      with open(args.json, "w") as f:
        json.dump(dict(result, partial=True), f, indent=1)
    where = f"B={size[0]:3d} ctx={size[1]:5d}" if kind == "decode" else f"T={size:5d}"
    line = f"{kind:8s}{where:20s} xla {point['xla_best_ms']:9.3f} ms " \
           f"ref {point['reference_gbps']:8.2f} GB/s {point['reference_tflops']:7.3f} TFLOP/s"
    if on_gpu and "kernel_error" in point:
      line += f" | kernel FAILED: {point['kernel_error'][:100]}"
    elif on_gpu:
      line += f" | kernel {point['kernel_ms']:9.3f} ms {point['kernel_gbps']:8.2f} GB/s " \
              f"{point['kernel_tflops']:7.3f} TFLOP/s x{point['kernel_speedup']:.2f} " \
              f"err {point['max_abs_err']:.2e}"
    print(line, flush=True)
  if not on_gpu:
    result["interpret_check"] = interpret_check(rng, dtype, shape)
    for c in result["interpret_check"]:
      print(f"interpret check ({c['kind']}, q {c['q_shape']}): max |kernel - ref| "
            f"{c['max_abs_err']:.2e} (not a timing)")
  result["summary"] = summarize(result["points"], shape, device_kind)
  print("summary:", json.dumps(result["summary"]))

  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)
  if args.plot:
    try:
      plot(result, args.plot)
    except ImportError:
      print("matplotlib missing: no plot", file=sys.stderr)
  checks = [p for p in result["points"] if p["max_abs_err"] is not None]
  checks += result.get("interpret_check", [])
  checks += [p for p in result["points"] if "kernel_error" in p]
  bad = [c for c in checks if not c["err_ok"]]
  if bad:
    print(f"MISMATCH: {len(bad)} points failed or exceed tolerance {TOLERANCE[dtype.name]}",
          file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
