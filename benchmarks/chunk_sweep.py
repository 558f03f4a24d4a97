"""Content-defined chunk size against hit rate and page fragmentation (no model: host-side).

For the prompts `benchmarks/agents_client.py` sends (N agents, round 2, both styles) this
runs the server's own segmenting (`implicit.message_cuts`, `implicit.segments`) for each
chunk size and measures what the collective step would see:

- hit rate: the share of each prompt's tokens in shared chunks. The bound is the share of
  tokens that repeat in other prompts (the system prompt, the question and the other
  agents' answers), from the same prompts cut at every message;
- fragmentation: pages of the segment layout (every chunk starts a page) over the pages
  of the plain contiguous layout;
- KV pages per agent: the agent's private pages plus its share of one master copy of
  every shared chunk (before forks, which depend on the recompute budget, not the chunks).

The answers are fixed sentences of the debate bank about `--answer-tokens` long, so the
sweep needs no model and runs in seconds:

  python benchmarks/chunk_sweep.py --json out/chunk_sweep.json --plot out/chunk_sweep.png
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import agents_client  # noqa: E402 - the benchmark's own prompt builders

from tokendance_jax import implicit  # noqa: E402
from tokendance_jax.chunking import ChunkConfig  # noqa: E402
from tokendance_jax.paging import pages_needed  # noqa: E402
from tokendance_jax.sampling import SamplingParams  # noqa: E402
from tokendance_jax.workload_text import person_names, text_banks  # noqa: E402

SIZES = ((8, 8), (16, 8), (16, 16), (32, 16), (64, 16), (64, 32), (128, 32))  # (avg, min_len)


def answers(n: int, tokens: int, encode) -> list[str]:
  """n distinct answers of about `tokens` tokens each, from the debate bank's sentences."""
  bank = text_banks("workload_debate")
  pool = [s for key in ("rules", "hints", "roles", "styles") for s in bank[key]]
  out = []
  for i in range(n):
    text, k = f"My answer, as agent {i}:", i
    while len(encode(text)) < tokens:
      text += " " + pool[k % len(pool)]
      k += 7
    out.append(text)
  return out


def prompts(style: str, n: int, tok, answer_tokens: int) -> list[list[dict]]:
  names = person_names(0, n)
  personas = [agents_client.persona(i, names[i]) for i in range(n)]
  prev = answers(n, answer_tokens, tok.encode)
  system, question = agents_client.system_prompt(n), agents_client.task_question()
  return [agents_client.build_messages(style, i, system=system, personas=personas, names=names,
                                       question=question, previous=prev) for i in range(n)]


def repeated_fraction(chats: list[list[dict]], tok) -> float:
  """Share of prompt tokens in message texts (or concatenated answers) another prompt holds."""
  total = rep = 0
  counts: dict[str, int] = {}
  pieces = []
  for msgs in chats:
    parts = [m["content"] for m in msgs]
    if any("One agent solution" in p for p in parts):  # concat: split the answers out
      parts = [q for p in parts for q in p.split("```")]
    pieces.append(parts)
    for p in set(parts):
      counts[p] = counts.get(p, 0) + 1
  for msgs, parts in zip(chats, pieces, strict=True):
    total += len(tok.encode_parts(tok.chat_parts(msgs)))
    rep += sum(len(tok.encode(p)) for p in parts if counts[p] > 1)
  return rep / total


def measure(chats, tok, cfg: ChunkConfig, page_size: int) -> dict:
  ids = [tok.encode_parts(tok.chat_parts(m)) for m in chats]
  openers = implicit.message_openers(tok)
  reqs = [implicit.Request(x, SamplingParams(), cuts=implicit.message_cuts(x, openers))
          for x in ids]
  segs = implicit.segments(reqs, implicit.no_masters, cfg)
  prompt = sum(len(x) for x in ids)
  shared = sum(len(s) for ss in segs for s in ss if s.shared)
  layout = sum(pages_needed(len(s), page_size) for ss in segs for s in ss)
  plain = sum(pages_needed(len(x), page_size) for x in ids)
  masters = {s.key: pages_needed(len(s), page_size) for ss in segs for s in ss if s.shared}
  private = sum(pages_needed(len(s), page_size) for ss in segs for s in ss if not s.shared)
  n = len(ids)
  return {"avg": cfg.avg, "min_len": cfg.min_len, "hit_rate": shared / prompt,
          "fragmentation": layout / plain, "chunks_per_prompt": sum(map(len, segs)) / n,
          "pages_per_agent": (private + sum(masters.values())) / n,
          "plain_pages_per_agent": plain / n}


def run(args) -> dict:
  from tokendance_jax.tokenizer import Tokenizer

  tok = Tokenizer.from_gguf()
  out = {"config": vars(args), "styles": {}}
  for style in args.styles.split(","):
    chats = prompts(style, args.agents, tok, args.answer_tokens)
    rows = [measure(chats, tok, ChunkConfig(avg=a, min_len=m, max_len=256, window=4),
                    args.page_size) for a, m in SIZES]
    out["styles"][style] = {"repeated_fraction": repeated_fraction(chats, tok), "sizes": rows}
    print(f"{style}: repeated text {out['styles'][style]['repeated_fraction']:.1%} of prompts")
    for r in rows:
      print(f"  avg {r['avg']:4d} min {r['min_len']:3d}: hit {r['hit_rate']:.1%}, fragmentation "
            f"{r['fragmentation']:.3f}, pages/agent {r['pages_per_agent']:.1f} "
            f"(plain {r['plain_pages_per_agent']:.1f}), chunks/prompt "
            f"{r['chunks_per_prompt']:.1f}")
  return out


def plot(result: dict, path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for style, res in result["styles"].items():
    labels = [f"{r['avg']}/{r['min_len']}" for r in res["sizes"]]
    axes[0].plot(labels, [r["hit_rate"] for r in res["sizes"]], marker="o", label=style)
    axes[0].axhline(res["repeated_fraction"], ls=":", color=axes[0].lines[-1].get_color())
    axes[1].plot(labels, [r["pages_per_agent"] for r in res["sizes"]], marker="o", label=style)
    axes[1].axhline(res["sizes"][0]["plain_pages_per_agent"], ls=":",
                    color=axes[1].lines[-1].get_color())
  axes[0].set(title="tokens in shared chunks (dotted: repeated text)", xlabel="avg / min_len",
              ylabel="share of prompt tokens")
  axes[1].set(title="KV pages per agent, one master copy (dotted: plain)",
              xlabel="avg / min_len", ylabel="pages")
  for ax in axes:
    ax.legend()
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--agents", type=int, default=16)
  p.add_argument("--answer-tokens", type=int, default=32)
  p.add_argument("--page-size", type=int, default=16)
  p.add_argument("--styles", default="messages,concat")
  p.add_argument("--json", default="out/chunk_sweep.json")
  p.add_argument("--plot", default="out/chunk_sweep.png")
  args = p.parse_args(argv)
  result = run(args)
  pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
  pathlib.Path(args.json).write_text(json.dumps(result, indent=2))
  plot(result, pathlib.Path(args.plot))
  return result


if __name__ == "__main__":
  main()
