"""Quality metrics of a reuse method against a reference run of the same prompts.

The reference is full recompute by the unpaged dense path (`dense_reference`,
memoized): next-token top-1 / KL at each prompt's end
(`next_token_quality`, `dense_next_token_quality`), the teacher-forced top-1
over every output token (`forced_top1`), and the greedy-trace token match of
two runs (`trace_match`). The session, the bench and the demo all measure
quality here.
"""

from __future__ import annotations

import functools

import numpy as np

__all__ = ["dense_next_token_quality", "dense_reference", "forced_top1", "next_token_quality",
           "trace_match"]


def next_token_quality(ref_logp, logp) -> dict:
  """Top-1 agreement and mean KL(ref || method) of next-token distributions [n, vocab]."""
  ref_logp, logp = np.asarray(ref_logp, np.float64), np.asarray(logp, np.float64)
  kl = np.sum(np.exp(ref_logp) * (ref_logp - logp), axis=-1)
  top1 = ref_logp.argmax(-1) == logp.argmax(-1)
  return {"top1_agreement": float(top1.mean()), "mean_kl": float(kl.mean()),
          "max_kl": float(kl.max())}


def forced_top1(model, res: dict, agents=None) -> dict:
  """Teacher-forced greedy agreement with full recompute, over every round.

  For every agent (or only those in `agents`), the prompt plus the tokens the
  method generated go through `model.dense_forward` (an unpaged full
  prefill); at each output position the dense argmax is compared with the
  token the method picked greedily. One sample per output token (agents x
  tokens per round), where the next-token top-1 has one per agent. Also the
  first token alone (`first_top1`), the agreement per round
  (`forced_top1_by_round`: round 0 reuses only the masters of text no agent
  wrote, later rounds also the agents' outputs), and `outputs_reproduced`:
  the share of outputs (agent-rounds) whose every token agrees, i.e. that
  full recompute's greedy decode of the same prompt would have generated
  token for token (up to the stop token, which is not kept in outputs).

  model is (params, cfg, tokenizer); res has "rounds" (each with "outputs":
  agent -> token ids) and "prompts" (per round: agent -> prompt token ids).
  """
  params, cfg, _ = model
  agree = total = first = firsts = whole = outputs = 0
  by_round = []
  for row, prompts in zip(res["rounds"], res["prompts"], strict=True):
    r_agree = r_total = 0
    for agent, ids in row["outputs"].items():
      if not ids or (agents is not None and agent not in agents):
        continue
      n = len(prompts[agent])
      seq = list(prompts[agent]) + list(ids)
      pred = dense_reference(params, seq, cfg, n - 1)[0][n - 1:n - 1 + len(ids)]
      hits = pred == np.asarray(ids)
      r_agree, r_total = r_agree + int(hits.sum()), r_total + len(ids)
      first, firsts = first + int(hits[0]), firsts + 1
      whole, outputs = whole + int(hits.all()), outputs + 1
    agree, total = agree + r_agree, total + r_total
    by_round.append(r_agree / r_total if r_total else None)
  return dict(forced_top1=agree / total if total else None, forced_tokens=total,
              first_top1=first / firsts if firsts else None, forced_top1_by_round=by_round,
              outputs_reproduced=whole / outputs if outputs else None)


_DENSE_MEMO: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
_DENSE_MEMO_LIMIT = 2_000  # entries hold a vocab-sized log-prob row (~200 KB each)
_DENSE_OWNERS: dict[int, object] = {}


def dense_reference(params, tokens: list[int], cfg, at: int) -> tuple[np.ndarray, np.ndarray]:
  """Full recompute by the unpaged dense path: (argmax of the logits at every position of
  `tokens` [t], log-probs [vocab] at position `at`).

  Memoized on (params, cfg, tokens, at): across a sweep most agents generate
  what the reference generated, so the same sequences come back point after
  point. The memo keeps each params tree it keys on alive, so an id is never
  reused.
  """
  import jax.numpy as jnp

  key = (id(params), cfg, tuple(int(x) for x in tokens), int(at))
  if key not in _DENSE_MEMO:
    if len(_DENSE_MEMO) >= _DENSE_MEMO_LIMIT:
      _DENSE_MEMO.clear()
    _DENSE_OWNERS[id(params)] = params
    t = -(-len(tokens) // 256) * 256  # causal: padding at the end changes no earlier logit
    padded = jnp.asarray(np.pad(np.asarray(tokens, np.int32), (0, t - len(tokens))))
    argmax, logp = _dense_fn()(params, padded, np.int32(at), cfg=cfg)
    _DENSE_MEMO[key] = (np.asarray(argmax)[:len(tokens)], np.asarray(logp))
  return _DENSE_MEMO[key]


@functools.cache
def _dense_fn():
  """jit(argmax of dense_forward's logits, log-softmax at one position), built once (jax is
  imported lazily here)."""
  import jax
  import jax.numpy as jnp

  from tokendance_jax import model as model_lib

  def fn(params, tokens, at, cfg):
    logits = model_lib.dense_forward(params, tokens, cfg=cfg)
    return jnp.argmax(logits, axis=-1), jax.nn.log_softmax(logits[at])

  return jax.jit(fn, static_argnames=("cfg",))


def dense_next_token_quality(model, prompts: dict, outputs: dict, logprobs: dict) -> dict:
  """Next-token top-1 and KL at every prompt's end against the dense full recompute
  (`next_token_quality`), from the method's log-probs there. The dense pass runs over
  prompt + output (the same sequence `forced_top1` scores, so the memo serves both)."""
  params, cfg, _ = model
  ref, got = [], []
  for agent, prompt in prompts.items():
    seq = list(prompt) + list(outputs.get(agent, []))
    ref.append(dense_reference(params, seq, cfg, len(prompt) - 1)[1])
    got.append(logprobs[agent])
  return next_token_quality(np.stack(ref), np.stack(got))


def trace_match(ref: dict, res: dict) -> float:
  """Fraction of output tokens equal to `ref`'s, position by position, over rounds and agents."""
  same = total = 0
  for a, b in zip(ref["rounds"], res["rounds"], strict=False):
    for agent, x in a["outputs"].items():
      y = b["outputs"].get(agent, [])
      same += sum(int(u == v) for u, v in zip(x, y, strict=False))
      total += max(len(x), len(y))
  return same / total if total else 1.0
