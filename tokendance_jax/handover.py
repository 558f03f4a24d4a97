"""Stages 8-9 of a round: decode every agent, then hand its output over and release the wave.

Decode runs in the engine (`Engine.adopt` / `step`: continuous batching,
preemption); this stage only adopts the wave's prefilled sequences and
collects them. Hand-over writes the K/V of each output's last token (a
sequence stopped by length never fed it), lets the method keep what the
next round reuses (`methods.Method.hand_over`: decode masters, prefix-cache
blocks), and releases the wave's tables.
"""

from __future__ import annotations

import numpy as np

from tokendance_jax.layout import AgentState, release
from tokendance_jax.progress import bar as progress_bar

__all__ = ["decode", "finish", "strip_stop"]


def strip_stop(a: AgentState) -> list[int]:
  """The agent's output without the stop token that ended it."""
  out = list(a.output_ids)
  if a.finish_reason == "stop" and out:
    out = out[:-1]
  return out


def decode(ctx, agents: list[AgentState], first: list[int], seqs: list) -> dict[str, list[int]]:
  """Decode every agent in the engine; `seqs` collects the adopted sequences as they are
  made (the caller aborts them on failure). Returns each agent's output, stop token
  stripped."""
  engine = ctx.engine
  for i, (a, tok) in enumerate(zip(agents, first, strict=True)):
    seqs.append(engine.adopt(a.tokens, a.table, tok, ctx.sampling_for(i, a.max_tokens)))
  bar = progress_bar(sum(a.max_tokens for a in agents), enabled=ctx.progress, unit="tok",
                     desc="decode")
  while engine.has_unfinished():
    before = sum(len(s.output) for s in seqs)
    engine.step()
    bar.update(sum(len(s.output) for s in seqs) - before)
  bar.close()
  for a, s in zip(agents, seqs, strict=True):
    done = engine.pop_finished(s.seq_id)
    a.tokens, a.output_ids, a.finish_reason = s.tokens, done.output_ids, done.finish_reason
  return {a.agent_id: strip_stop(a) for a in agents}


def finish(ctx, method, agents: list[AgentState], outputs: dict[str, list[int]]) -> None:
  """Complete output K/V, hand outputs to the method (masters / prefix cache), release the
  wave's tables."""
  pending = []
  for a in agents:
    out = outputs[a.agent_id]
    last = a.num_prompt + len(out) - 1  # the last output position that must hold K/V
    if out and last == len(a.tokens) - 1:  # stopped by length: its last token was never fed
      a.table.ensure(len(a.tokens), ctx.allocator)
      pending.append((a.table, a.tokens, np.array([last])))
  if pending:
    ctx.run(pending, want_logits=False)
  for a in agents:
    method.hand_over(a, outputs[a.agent_id], ctx)
  release(agents, ctx.allocator)
