"""Drive a multi-agent workload through a `RoundSession` with the real model and tokenizer.

Round r+1 consumes the model's own outputs of round r: each agent's
generated token ids become a shared segment of the other agents' prompts,
byte-identical, with no re-tokenization. Prompts are wrapped in the model's
ChatML turns (the system turn is part of the shared system segment).
"""

from __future__ import annotations

import dataclasses
import time

from tokendance_jax import workloads
from tokendance_jax.progress import bar as progress_bar
from tokendance_jax.rounds import AgentPrompt, ReusePolicy, Round, Segment
from tokendance_jax.session import RoundSession

SYSTEM_OPEN = "<|im_start|>system\n"
SYSTEM_CLOSE = "<|im_end|>\n<|im_start|>user\n"
TURN_CLOSE = "<|im_end|>\n<|im_start|>assistant\n"


class PromptBuilder:
  """Workload text -> token segments, with a tokenization memo (shared text is encoded once)."""

  def __init__(self, workload: workloads.Workload, tokenizer):
    self.workload, self.tok = workload, tokenizer
    self._memo: dict[str, tuple[int, ...]] = {}

  def encode(self, text: str) -> tuple[int, ...]:
    if text not in self._memo:
      self._memo[text] = tuple(self.tok.encode(text))
    return self._memo[text]

  def round(self, r: int, outputs: list[dict[int, list[int]]]) -> Round:
    """outputs[r'][agent] = token ids agent generated in round r'."""
    prompts = []
    for i, agent_id in enumerate(self.workload.agents):
      items = self.workload.prompt(r, i)
      segs = [self._segment(item, k, len(items), outputs) for k, item in enumerate(items)]
      segs = [s for s in segs if s is not None and len(s)]
      prompts.append(AgentPrompt(agent_id, segs, max_tokens=self.workload.max_tokens(r, i)))
    return Round(prompts)

  def _segment(self, item, k: int, n: int, outputs) -> Segment | None:
    if isinstance(item, workloads.OutputRef):
      ids = outputs[item.round].get(item.agent, [])
      return Segment(tuple(ids), shared=not item.private, name=f"out:{item.agent}:{item.round}")
    text = item.text
    if k == 0:
      text = SYSTEM_OPEN + text + SYSTEM_CLOSE
    if k == n - 1:
      text = text + TURN_CLOSE
    return Segment(self.encode(text), shared=item.shared, name=item.name)


@dataclasses.dataclass
class RoundRunConfig:
  method: str = "tokendance"
  preset: str = "debate"
  agents: int = 6
  rounds: int = 3
  select: str = "block"
  recompute: float = 0.05
  check_layer: int = 1
  epic_k: int = 16
  tau: float | None = None
  masters: str = "context"
  seed: int = 0
  order: str | None = None
  max_tokens: int | None = None  # override the workload's output caps
  quality: bool = True


def make_workload(preset: str, *, agents: int, rounds: int, seed: int = 0,
                  order: str | None = None, max_tokens: int | None = None) -> workloads.Workload:
  """The seeded workload of `preset` at this size; max_tokens (if set) fixes every output cap."""
  overrides = dict(n_agents=agents, rounds=rounds, seed=seed)
  if order:
    overrides["order"] = order
  if max_tokens:
    overrides["out_tokens_median"] = max_tokens
    overrides["out_tokens_clip"] = (max_tokens, max_tokens)
  return workloads.Workload(workloads.preset(preset, **overrides))


def round_loop(sess: RoundSession, builder: PromptBuilder, rounds: int, *, on_round=None,
               bar=None) -> list[dict]:
  """Run `rounds` rounds of builder's workload through sess; round r+1's prompts hold the
  token ids the agents generated in the rounds before it.

  Returns one row per round: `RoundResult.to_json()` plus "private_share".
  on_round(sess, rnd, res, row, started), if given, runs after each round
  (started: `time.perf_counter()` just before `run_round`) and may add fields to row.
  """
  wl = builder.workload
  outputs: list[dict[int, list[int]]] = []
  rows = []
  for r in range(rounds):
    rnd = builder.round(r, outputs)
    started = time.perf_counter()
    res = sess.run_round(rnd)
    outputs.append({wl.agents.index(a): ids for a, ids in res.outputs.items()})
    row = res.to_json()
    row["private_share"] = round_private_share(rnd)
    if on_round is not None:
      on_round(sess, rnd, res, row, started)
    rows.append(row)
    if bar is not None:
      bar.update(1)
  return rows


def run_rounds(params, cfg, tokenizer, rc: RoundRunConfig, *, cache_cfg, attn=None,
               progress: bool = False, on_round=None, mesh=None) -> dict:
  """Run rc.rounds rounds of rc.preset with rc.method; returns the JSON-ready result.

  on_round(rnd, res), if given, runs after each round. mesh: None (one device)
  or a mesh / "data=2,model=3" spec (see `sharding`).
  """
  wl = make_workload(rc.preset, agents=rc.agents, rounds=rc.rounds, seed=rc.seed,
                     order=rc.order, max_tokens=rc.max_tokens)
  builder = PromptBuilder(wl, tokenizer)
  policy = ReusePolicy(select=rc.select, recompute=rc.recompute, check_layer=rc.check_layer,
                       epic_k=rc.epic_k, tau=rc.tau, masters=rc.masters)
  sess = RoundSession(params, cfg, method=rc.method, policy=policy, cache_cfg=cache_cfg,
                      attn=attn, quality=rc.quality, mesh=mesh)
  hook = None if on_round is None else lambda _s, rnd, res, _row, _t0: on_round(rnd, res)
  bar = progress_bar(rc.rounds, enabled=progress, unit="round", desc=rc.method, leave=True)
  start = time.perf_counter()
  try:
    rounds = round_loop(sess, builder, rc.rounds, on_round=hook, bar=bar)
  finally:
    bar.close()
    sess.close()
  return {"method": rc.method, "preset": rc.preset, "agents": rc.agents,
          "config": dataclasses.asdict(rc), "page_size": cache_cfg.page_size,
          "bytes_per_page": cache_cfg.bytes_per_page(cfg), "seconds": time.perf_counter() - start,
          "leaked_pages": sess.allocator.num_used, "rounds": rounds}


def round_private_share(rnd: Round) -> float:
  """Private tokens / all prompt tokens of a round."""
  private = sum(len(s) for p in rnd.prompts for s in p.segments if not s.shared)
  return private / max(sum(p.num_tokens for p in rnd.prompts), 1)
