"""`jax.profiler` traces of rounds, and a summary of where a phase's time goes.

`RoundSession` names its prefill phases as trace spans (`tokendance/check`,
`tokendance/recompute`, `tokendance/copy`, `tokendance/master_prefill`).
`trace(dir)` records a run without the Python tracer (its events would
drown the device ones); the trace opens in Perfetto / TensorBoard.
`summarize(dir)` reads the trace back and adds up, per phase, the XLA thunks
that ran inside it: by jitted function and by HLO op kind.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import gzip
import json
import pathlib
import re

PHASE_PREFIX = "tokendance/"
CONTAINERS = ("while", "conditional", "call")
TRACE_EVENT_CAP = 1_000_000


@contextlib.contextmanager
def trace(log_dir: str):
  """Record a jax.profiler trace of the block into log_dir (host + XLA thunks, no Python)."""
  import jax

  options = jax.profiler.ProfileOptions()
  options.python_tracer_level = 0
  options.host_tracer_level = 2
  with jax.profiler.trace(log_dir, profiler_options=options):
    yield


def newest_trace(log_dir: str) -> pathlib.Path:
  files = sorted(pathlib.Path(log_dir).glob("plugins/profile/*/*.trace.json.gz"))
  if not files:
    raise FileNotFoundError(f"no *.trace.json.gz under {log_dir}/plugins/profile")
  return files[-1]


def summarize(log_dir: str, top: int = 8) -> dict:
  """{phase: {seconds, spans, thunk_seconds, by_function, by_op}} from the newest trace.

  Only leaf thunks count (a loop's thunk spans its body's). Thunk seconds are
  summed over threads, so on several cores they can exceed the phase's wall
  seconds; the rest of a phase is host work, dispatch and compilation.
  `by_op` groups HLO op names by kind (`fusion.12` and `fusion.7` are both
  `fusion`; `ynn_fusion` is a dot fused by XLA's CPU backend). A trace
  that hit the profiler's event cap covers only the start of the run:
  `truncated` says so (profile a smaller run).
  """
  with gzip.open(newest_trace(log_dir)) as f:
    events = json.load(f)["traceEvents"]
  truncated = len(events) >= TRACE_EVENT_CAP  # the profiler keeps the first ~1M events
  spans = [e for e in events if e.get("ph") == "X" and e["name"].startswith(PHASE_PREFIX)]
  # leaf thunks only: a while / conditional / call thunk's span contains its body's thunks
  thunks = [e for e in events if e.get("ph") == "X" and "hlo_op" in e.get("args", {})
            and _op_kind(e["args"]["hlo_op"]) not in CONTAINERS]
  thunks.sort(key=lambda e: e["ts"])
  starts = [e["ts"] for e in thunks]
  out: dict[str, dict] = {}
  for span in spans:
    phase = span["name"][len(PHASE_PREFIX):]
    s = out.setdefault(phase, dict(seconds=0.0, spans=0, thunk_seconds=0.0,
                                   by_function=collections.Counter(),
                                   by_op=collections.Counter()))
    s["seconds"] += span["dur"] / 1e6
    s["spans"] += 1
    lo, hi = span["ts"], span["ts"] + span["dur"]
    for e in thunks[bisect.bisect_left(starts, lo):bisect.bisect_right(starts, hi)]:
      sec = e.get("dur", 0.0) / 1e6
      s["thunk_seconds"] += sec
      s["by_function"][e["args"].get("hlo_module", "?")] += sec
      s["by_op"][_op_kind(e["args"]["hlo_op"])] += sec
  for s in out.values():
    for key in ("by_function", "by_op"):
      s[key] = dict(s[key].most_common(top))
    s["truncated"] = truncated
  return out


def _op_kind(name: str) -> str:
  return re.sub(r"[._]\d+$", "", name)
