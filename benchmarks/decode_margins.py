"""How close to a tie the reference answers of `agents_client.py` are, token by token.

The client benchmark scores reuse by greedy tokens equal to the no-reuse run's, compared
position by position: one flipped token costs every token after it. How many flips any
approximation risks depends on the reference itself. This script teacher-forces each "none"
answer of rounds 2+ after its prompt through `model.dense_forward` (the unpaged reference
path, no server) and records, at every answer token, the margin between the top-1 and top-2
log-probabilities. For each threshold t it reports the answers holding a step with margin
below t, and the share of reference tokens at or after the first such step: the tokens a
perturbation of the log-probs by about t can lose.

  python benchmarks/decode_margins.py --from docs/results/agents_client_16x3.json \\
      --json out/decode_margins.json --plot out/decode_margins.png
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import agents_client  # noqa: E402 - the benchmark's own prompt builders

THRESHOLDS = (0.01, 0.02, 0.05, 0.1, 0.2)


def at_risk(margins: list[list[float]], threshold: float) -> tuple[int, int, int]:
  """(answers with a step below `threshold`, tokens from each one's first such step on,
  tokens in all)."""
  answers = tokens = 0
  for m in margins:
    below = np.flatnonzero(np.asarray(m) < threshold)
    if below.size:
      answers += 1
      tokens += len(m) - int(below[0])
  return answers, tokens, sum(len(m) for m in margins)


def reference_margins(result: dict, style: str, loaded) -> list[list[float]]:
  """Per reference answer of rounds 2+: the top-1 minus top-2 log-prob at each token."""
  import jax
  import jax.numpy as jnp

  from tokendance_jax import model

  params, cfg, tok = loaded
  c = result["config"]
  n = c["agents"]
  names = agents_client.person_names(0, n)
  system = agents_client.system_prompt(n)
  personas = [agents_client.persona(i, names[i]) for i in range(n)]
  question = agents_client.task_question(c["seed"])
  rounds = result["runs"][style]["none"]["rounds"]
  forward = jax.jit(lambda t: jax.nn.log_softmax(model.dense_forward(params, t, cfg=cfg), -1))
  out = []
  for r in range(1, len(rounds)):
    previous = agents_client.answers(rounds[r - 1])
    for i in range(n):
      msgs = agents_client.build_messages(style, i, system=system, personas=personas,
                                          names=names, question=question, previous=previous)
      prompt = tok.encode_parts(tok.chat_parts(msgs))
      answer = tok.encode_parts([(rounds[r]["requests"][i]["text"], False)])
      ids = np.array(prompt + answer)
      size = 1 << int(np.ceil(np.log2(len(ids))))  # few shapes, few compiles
      lp = np.asarray(forward(jnp.asarray(np.pad(ids, (0, size - len(ids))))))
      lp = lp[len(prompt) - 1:len(prompt) - 1 + len(answer)]
      if not (lp.argmax(-1) == np.array(answer)).all():
        raise SystemExit(f"{style} round {r + 1} agent {i}: the reference path does not give "
                         f"the recorded greedy answer; the margins would not describe it")
      top = np.sort(lp, -1)
      out.append((top[:, -1] - top[:, -2]).tolist())
  return out


def summarize(margins: dict[str, list[list[float]]]) -> dict:
  summary = {}
  for style, ms in margins.items():
    rows = []
    for t in THRESHOLDS:
      answers, tokens, total = at_risk(ms, t)
      rows.append({"threshold": t, "answers": answers, "of_answers": len(ms),
                   "tokens_at_risk": tokens, "tokens": total, "share": tokens / max(total, 1)})
    summary[style] = rows
  return summary


def plot(summary: dict, path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for style, rows in summary.items():
    ax.plot([r["threshold"] for r in rows], [r["share"] for r in rows], marker="o", label=style)
  ax.set_xscale("log")
  ax.set_xlabel("log-prob margin threshold t (top-1 minus top-2)")
  ax.set_ylabel("reference tokens at or after a step below t")
  ax.set_ylim(0, 1)
  ax.grid(alpha=0.3)
  ax.legend()
  ax.set_title("How much of the reference a perturbation of size t can flip")
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--from", dest="source", type=pathlib.Path, required=True,
                 help="an agents_client.py JSON with a 'none' run (real model)")
  p.add_argument("--json", type=pathlib.Path, default=None)
  p.add_argument("--plot", type=pathlib.Path, default=None)
  args = p.parse_args(argv)
  result = json.loads(args.source.read_text())
  if result["config"].get("tiny"):
    p.error(f"{args.source}: a --tiny run; the margins need the real model")
  from tokendance_jax import api

  loaded = api.load_model(dtype="float32")
  margins = {style: reference_margins(result, style, loaded) for style in result["runs"]}
  summary = summarize(margins)
  for style, rows in summary.items():
    for r in rows:
      print(f"{style:9s} t={r['threshold']:<5g} answers {r['answers']:2d}/{r['of_answers']}  "
            f"tokens at risk {r['tokens_at_risk']:4d}/{r['tokens']} ({r['share']:.1%})")
  out = {"source": str(args.source), "summary": summary, "margins": margins}
  if args.json:
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1))
  if args.plot:
    plot(summary, args.plot)
  return out


if __name__ == "__main__":
  main()
