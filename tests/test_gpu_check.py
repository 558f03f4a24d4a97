"""benchmarks/gpu_check.sh --quick end to end on this machine, and the JSON it writes.

On CPU every stage runs at its smallest (tiny shapes, one point each, ~1
min on 2 cores); the compiled kernel tests are recorded as skipped. On a GPU
the same command without --quick is the device check (see docs/gpu.md).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.smoke
def test_gpu_check_quick_writes_its_report(tmp_path):
  out = tmp_path / "gpu"
  env = dict(os.environ, PYTHON=sys.executable)
  run = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--out", str(out),
                        "--quick"], env=env, capture_output=True, text=True, timeout=1200)
  log = (out / "gpu_check.log").read_text() if (out / "gpu_check.log").exists() else ""
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:] + log[-3000:]
  report = json.loads((out / "gpu_check.json").read_text())
  assert report["benchmark"] == "gpu_check" and report["quick"] is True
  stages = report["stages"]
  for name in ("kernel_tiny", "model", "rounds"):
    assert stages[name]["rc"] == 0 and not stages[name]["timed_out"], (name, stages[name])
  results = report["results"]
  kernel = results["kernel_tiny"]
  assert kernel["points"] and all(p["reference_ms"] > 0 for p in kernel["points"])
  assert all(c["err_ok"] for c in kernel.get("interpret_check", []))
  assert {p["mode"] for p in results["model"]["points"]} == {"prefill", "decode"}
  rounds = results["rounds"]
  assert {p["method"] for p in rounds["points"]} == {"prefix", "cacheblend", "tokendance"}
  assert all(p["prefill_seconds"] > 0 for p in rounds["points"])
  assert set(rounds["ratios"]) == {"tiny/2/cacheblend_over_tokendance",
                                   "tiny/2/prefix_over_tokendance"}
  # Nothing was timed on a GPU here, so no target may read as met or missed.
  if report["device"]["platform"] != "gpu":
    assert stages["tests"]["skipped"]
    assert report["tuning"]["kernel_faster"] is None
    for key in ("decode_40pct_hbm_qwen7b", "decode_2x_xla_qwen7b", "prefill_150_tflops_qwen7b_8k"):
      assert report["targets"][key] is None
  files = sorted(p.name for p in out.iterdir())
  assert len(files) <= 8, files  # the device tool hands back at most 8 files
  try:
    import matplotlib  # noqa: F401
  except ImportError:
    return
  assert {"kernel_tiny.png", "model.png", "rounds.png"} <= set(files)
