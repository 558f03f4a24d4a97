"""Merge the stages of benchmarks/gpu_check.sh into one gpu_check.json with the issue's targets.

  python benchmarks/gpu_check_report.py WORK_DIR OUT.json [--quick 0|1]

WORK_DIR holds stages.tsv (name, exit code, seconds), tests.xml (pytest's
junit report, GPU only) and each benchmark's JSON. The report keeps every
benchmark result whole and adds `targets` (None where not measured) and
`tuning`: whether this run would let kernels/tuning.py set kernel_faster
for the device kind (the kernels faster than XLA at every kernel_bench
point of both shapes, with no error past tolerance).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import xml.etree.ElementTree as ET

BENCHES = ("kernel_smollm2", "kernel_qwen7b", "kernel_tiny", "model", "rounds", "rounds_kernel")


def _stages(work: pathlib.Path) -> dict:
  out = {}
  path = work / "stages.tsv"
  for line in path.read_text().splitlines() if path.exists() else []:
    name, rc, seconds = line.split("\t")
    out[name] = {"rc": None if rc == "skipped" else int(rc), "seconds": int(seconds),
                 "timed_out": rc in ("124", "137"), "skipped": rc == "skipped"}
  return out


def _tests(work: pathlib.Path) -> dict | None:
  path = work / "tests.xml"
  if not path.exists():
    return None
  suite = ET.parse(path).getroot()
  suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
  return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}


def _decode_tokens_per_s(model: dict | None, batch: int) -> dict:
  points = (model or {}).get("points", [])
  return {p["attention"]: p["tokens_per_s"] for p in points
          if p.get("mode") == "decode" and p.get("batch") == batch and "tokens_per_s" in p}


def targets(results: dict) -> dict:
  qwen = (results.get("kernel_qwen7b") or {}).get("summary", {})
  decode64 = _decode_tokens_per_s(results.get("model"), 64)
  runs = [results.get(name) for name in ("rounds", "rounds_kernel")]
  rounds = {f"{k} ({r['attention']})": v for r in runs if r for k, v in r["ratios"].items()}
  best = max(decode64.values(), default=None)
  return {
      "decode_40pct_hbm_qwen7b": qwen.get("target_decode_40pct_hbm"),
      "decode_2x_xla_qwen7b": qwen.get("target_decode_2x_xla"),
      "prefill_150_tflops_qwen7b_8k": qwen.get("target_prefill_150_tflops"),
      "engine_decode_smollm2_b64_tokens_per_s": decode64 or None,
      "engine_decode_10k_tokens_per_s": None if best is None else best >= 10_000,
      "round_prefill_cacheblend_over_tokendance": {
          k: v for k, v in rounds.items() if "cacheblend_over_tokendance" in k} or None,
  }


def tuning_verdict(results: dict) -> dict:
  kernel = [results.get(k) for k in ("kernel_smollm2", "kernel_qwen7b")]
  if not all(kernel) or not all(r["summary"]["kernel_timed"] for r in kernel):
    return {"kernel_faster": None, "why": "the kernels were not timed at both shapes here"}
  errors = [p for r in kernel for p in r["points"] if p.get("err_ok") is False]
  skipped = sum(len(r.get("skipped", [])) for r in kernel)
  faster = all(r["summary"]["kernel_faster_everywhere"] for r in kernel)
  ok = faster and not errors and not skipped
  why = ("faster than XLA at every point of both shapes" if ok else
         f"{len(errors)} points past tolerance or failed" if errors else
         f"{skipped} points skipped for time" if skipped else
         "slower than XLA at some point (see each summary's min_speedup)")
  return {"kernel_faster": ok, "why": why,
          "min_speedup": {r["config"]["shapes"]: r["summary"]["min_speedup"] for r in kernel}}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("work", type=pathlib.Path)
  p.add_argument("out", type=pathlib.Path)
  p.add_argument("--quick", type=int, default=0)
  args = p.parse_args(argv)
  results = {}
  for name in BENCHES:
    path = args.work / f"{name}.json"
    if path.exists():
      results[name] = json.loads(path.read_text())
  stages = _stages(args.work)
  device = next((r.get("device") for r in results.values() if r.get("device")), None)
  report = {
      "benchmark": "gpu_check", "quick": bool(args.quick), "device": device,
      "stages": stages, "tests": _tests(args.work), "targets": targets(results),
      "tuning": tuning_verdict(results), "results": results,
  }
  args.out.write_text(json.dumps(report, indent=1))
  failed = [n for n, s in stages.items() if s["rc"] not in (0, None)]
  missing = [n for n in stages if n != "tests" and n not in results]
  summary = ", ".join(f"{name}={stage['rc']}" for name, stage in stages.items())
  print(f"wrote {args.out}: stages {summary}")
  print(f"targets: {json.dumps(report['targets'])}")
  print(f"tuning: {json.dumps(report['tuning'])}")
  if failed or missing:
    print(f"FAILED stages: {failed}; without a result: {missing}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
