"""One bench run and its point: `run_method` drives a method through the rounds of a workload
(`roundrun.round_loop`) and records compile seconds per round and, where asked, quality
against the dense full recompute; `run_point` / `summary` turn a run into a JSON point.

Times exclude JAX tracing and compilation where they say `_net`: `CompileClock` attributes
the compile seconds to the round (and phase) they were spent in.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import time

import numpy as np

from tokendance_jax.eval.config import BenchConfig, judged_agents, reuse_policy, split_label
from tokendance_jax.eval.quality import dense_next_token_quality, trace_match
from tokendance_jax.rounds import REUSE_METHODS


class CompileClock:
  """Seconds JAX spends tracing, lowering and compiling, by when each step ended."""

  EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
            "/jax/core/compile/jaxpr_to_mlir_module_duration",
            "/jax/core/compile/backend_compile_duration")
  _instance = None

  def __init__(self):
    import jax

    self.events: list[tuple[float, float]] = []
    jax.monitoring.register_event_duration_secs_listener(self._on_event)

  @classmethod
  def get(cls) -> CompileClock:
    if cls._instance is None:
      cls._instance = cls()
    return cls._instance

  def _on_event(self, event: str, duration: float, **_) -> None:
    if event in self.EVENTS:
      self.events.append((time.perf_counter(), duration))

  def within(self, t0: float, t1: float) -> float:
    """Compile seconds spent inside the wall-clock window [t0, t1]."""
    return float(sum(min(d, end - t0) for end, d in self.events if t0 <= end <= t1))


@functools.cache
def load_model():
  """(params, cfg, tokenizer), loaded once per process."""
  from tokendance_jax import api

  return api.load_model(dtype="float32", progress=False)


def run_method(model, bc: BenchConfig, label: str, agents: int, *, quality: bool,
               num_pages: int | None) -> dict:
  """bc.rounds rounds of the run `label` (METHOD or METHOD:MASTERS) by
  `roundrun.round_loop`, plus compile time per round.

  num_pages None sizes the pool for the point (`auto_pages`). Returns the
  run_rounds-style result dict ("method" is the label, "prompts" each round's
  prompt token ids per agent); raises OutOfPages when the pool is too small.
  """
  from tokendance_jax.config import CacheConfig
  from tokendance_jax.roundrun import PromptBuilder, make_workload, round_loop
  from tokendance_jax.session import RoundSession

  params, cfg, tok = model
  wl = make_workload(bc.preset, agents=agents, rounds=bc.rounds, seed=bc.seed, order=bc.order,
                     max_tokens=bc.max_tokens)
  builder = PromptBuilder(wl, tok)
  pages = num_pages or auto_pages(builder, wl, bc)
  cache_cfg = CacheConfig(num_pages=pages, page_size=bc.page_size)
  policy = reuse_policy(bc, label)
  method, _ = split_label(label, bc)
  # Quality is measured against the dense full recompute (`dense_reference`), not a second
  # paged prefill: the same dense pass then also serves `forced_top1`.
  sess = RoundSession(params, cfg, method=method, policy=policy, cache_cfg=cache_cfg,
                      quality=False, keep_logprobs=quality)
  clock, prompts, judged = CompileClock.get(), [], judged_agents(bc, agents)

  def measure(sess, rnd, res, row: dict, t0: float) -> None:
    prompts.append({p.agent_id: p.tokens for p in rnd.prompts})
    if quality:
      mine = {a: p for a, p in prompts[-1].items() if a in judged}
      row["quality"] = dense_next_token_quality(model, mine, res.outputs, res.logprobs)
    row["prefill_compile_seconds"] = clock.within(t0, t0 + res.prefill_seconds)
    row["round_compile_seconds"] = clock.within(t0, t0 + res.round_seconds)
    for phase in ("check", "recompute"):
      row[f"{phase}_compile_seconds"] = sum(clock.within(a, b) for name, a, b in sess.timeline
                                            if name == phase)

  start = time.perf_counter()
  try:
    rows = round_loop(sess, builder, bc.rounds, on_round=measure)
  finally:
    sess.close()
    leaked = sess.allocator.num_used
    del sess
    gc.collect()
  reuse = method in REUSE_METHODS
  return {"method": label, "preset": bc.preset, "agents": agents, "select": policy.select,
          "masters": policy.masters if reuse else None, "tau": policy.tau if reuse else None,
          "policy": dataclasses.asdict(policy),
          "recompute": bc.recompute, "num_pages": pages, "page_size": bc.page_size,
          "bytes_per_page": cache_cfg.bytes_per_page(cfg), "quality": quality,
          "seconds": time.perf_counter() - start, "leaked_pages": leaked, "rounds": rows,
          "prompts": prompts}


def auto_pages(builder, wl, bc: BenchConfig) -> int:
  """A pool for every method at this size: every round's dense prompts + outputs, plus room
  for the masters / prefix cache of two rounds (the quality reference fits too)."""
  from tokendance_jax.paging import pages_needed

  ps, need = bc.page_size, 0
  outputs = [{i: [0] * wl.max_tokens(r, i) for i in range(len(wl.agents))}
             for r in range(bc.rounds)]
  for r in range(bc.rounds):
    rnd = builder.round(r, outputs[:r])
    dense = sum(pages_needed(len(s), ps) for p in rnd.prompts for s in p.segments)
    dense += sum(pages_needed(p.max_tokens + 1, ps) + 1 for p in rnd.prompts)
    shared = sum(pages_needed(len(s), ps) for s in rnd.shared_segments().values())
    need = max(need, int(1.05 * dense) + 2 * shared + 64)
  # few distinct pool sizes: each is a new shape to compile
  return 1 << (need - 1).bit_length() if need <= 4096 else -(-need // 2048) * 2048


# -- summaries -----------------------------------------------------------------------------


def summary(res: dict) -> dict:
  """One point: averages over rounds >= 1 (round 0 has no agent outputs to share)."""
  rows = [r for r in res["rounds"] if r["round"] >= 1] or res["rounds"]
  mean = lambda key: float(np.mean([r[key] for r in rows]))  # noqa: E731
  stat = lambda key: float(np.mean([r["stats"][key] for r in rows]))  # noqa: E731
  out = dict(method=res["method"], agents=res["agents"], select=res["select"],
             masters=res.get("masters"), tau=res.get("tau"),
             recompute=res["recompute"], prefill_seconds=mean("prefill_seconds"),
             round_seconds=mean("round_seconds"), kv_bytes_per_agent=mean("kv_bytes_per_agent"),
             shared_kv_bytes_per_agent=mean("shared_kv_bytes_per_agent"),
             pages_in_use=mean("pages_in_use"), computed_fraction=stat("computed_fraction"),
             private_share=mean("private_share"), check_seconds=stat("check_seconds"),
             copy_seconds=stat("copy_seconds"), recompute_seconds=stat("recompute_seconds"),
             master_prefill_seconds=stat("master_prefill_seconds"),
             pages_copied=stat("pages_copied"), master_tokens=stat("master_tokens"),
             leaked_pages=res["leaked_pages"])
  per_agent = recompute_per_agent(rows)
  if per_agent:
    out["shared_recomputed_by_agent"] = per_agent
  if "deviation" in rows[-1]["stats"]:  # relative key deviation at the check layer, last round
    out["deviation"] = rows[-1]["stats"]["deviation"]
  if "prefill_compile_seconds" in rows[0]:
    out["prefill_compile_seconds"] = mean("prefill_compile_seconds")
    out["round_compile_seconds"] = mean("round_compile_seconds")
  q = [r["quality"] for r in rows if "quality" in r and "mean_kl" in r["quality"]]
  if q:
    out["top1_agreement"] = float(np.mean([x["top1_agreement"] for x in q]))
    out["mean_kl"] = float(np.mean([x["mean_kl"] for x in q]))
  return out


def recompute_per_agent(rows: list[dict]) -> dict | None:
  """The share of its shared tokens each agent recomputed, over `rows`: min / median / mean /
  max and every value (agent-rounds), or None where no round records per-agent counts."""
  shares = [r["stats"]["shared_recomputed_per_agent"][a] / n
            for r in rows for a, n in r["stats"].get("shared_tokens_per_agent", {}).items()
            if n and a in r["stats"].get("shared_recomputed_per_agent", {})]
  if not shares:
    return None
  return dict(min=float(np.min(shares)), median=float(np.median(shares)),
              mean=float(np.mean(shares)), max=float(np.max(shares)),
              values=[round(float(x), 4) for x in shares])


def run_point(res: dict, ref: dict | None) -> dict:
  """summary() plus compile-free prefill with its breakdown, per-round rows and trace match."""
  p = dict(kind="run", **summary(res))
  compile_s = p.pop("prefill_compile_seconds", 0.0)
  p["prefill_seconds_net"] = max(p["prefill_seconds"] - compile_s, 0.0)
  p["round_seconds_net"] = max(p["round_seconds"] - p.pop("round_compile_seconds", 0.0), 0.0)
  p["compile_seconds"] = compile_s
  parts = sum(p[k] for k in ("check_seconds", "copy_seconds", "recompute_seconds",
                             "master_prefill_seconds"))
  p["other_seconds"] = max(p["prefill_seconds"] - parts, 0.0)  # the parts include compile
  p["num_pages"], p["rounds"] = res["num_pages"], len(res["rounds"])
  p["bytes_per_page"] = res["bytes_per_page"]
  rows = [r for r in res["rounds"] if r["round"] >= 1] or res["rounds"]
  p["prompt_tokens_per_agent"] = float(np.mean([r["stats"]["prompt_tokens"] for r in rows])
                                       / res["agents"])
  p.update(arithmetic(res))
  p["per_round"] = [round_row(r) for r in res["rounds"]]
  if ref is not None and ref is not res:
    p["trace_match"] = trace_match(ref, res)
  elif ref is res:
    p["trace_match"] = 1.0
  return p


def arithmetic(res: dict) -> dict:
  """Model FLOPs of the check and recompute steps over rounds >= 1, their seconds without
  the compile seconds inside those steps, and the achieved GFLOP/s."""
  rows = [r for r in res["rounds"] if r["round"] >= 1] or res["rounds"]
  out = {}
  for phase, flops_key in (("check", "check_flops"), ("recompute", "computed_flops")):
    flops = sum(r["stats"].get(flops_key, 0.0) for r in rows)
    net = sum(max(r["stats"][f"{phase}_seconds"] - r.get(f"{phase}_compile_seconds", 0.0), 0.0)
              for r in rows)
    out[f"{phase}_gflop"] = flops / 1e9 / len(rows)
    out[f"{phase}_seconds_net"] = net / len(rows)
    out[f"{phase}_gflops_per_s"] = flops / net / 1e9 if net > 0 and flops > 0 else None
  return out


def round_row(r: dict) -> dict:
  """One round of a run as the JSON point's "per_round" row."""
  out = {k: r[k] for k in ("round", "prefill_seconds", "round_seconds", "kv_bytes_per_agent",
                           "shared_kv_bytes_per_agent", "pages_in_use", "private_share")}
  out.update(computed_fraction=r["stats"]["computed_fraction"],
             preemptions=r["stats"]["preemptions"],
             compile_seconds=r.get("round_compile_seconds", 0.0),
             output_tokens=sum(len(v) for v in r["outputs"].values()))
  if "quality" in r:
    out["quality"] = r["quality"]
  return out


def point_line(p: dict) -> str:
  """The progress line of one point."""
  q = (f", top-1 {p['top1_agreement']:.3f}, KL {p['mean_kl']:.4f}" if "top1_agreement" in p
       else "")
  t = f", trace {p['trace_match']:.3f}" if "trace_match" in p else ""
  return (f"{p['method']:10s} {p['agents']:4d} agents: prefill {p['prefill_seconds_net']:.2f} s "
          f"(+{p['compile_seconds']:.1f} compile), KV/agent {p['kv_bytes_per_agent'] / 2**20:.2f}"
          f" MiB, shared {p['shared_kv_bytes_per_agent'] / 2**20:.2f} MiB, computed "
          f"{100 * p['computed_fraction']:.1f}%, private {100 * p['private_share']:.1f}%{q}{t}")
