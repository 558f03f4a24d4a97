"""The `tokendance` command line: generate text (and, later, rounds, benchmarks, serving)."""

from __future__ import annotations

import argparse
import sys
import time


def _add_model_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                 help="parameter and KV-cache dtype (float32 is faster on CPU)")
  p.add_argument("--cache-dir", default=None, help="where converted weights are cached (orbax)")
  p.add_argument("--force-kernel", action="store_true",
                 help="use the Pallas kernels on CPU too (interpret mode; slow)")
  p.add_argument("--num-pages", type=int, default=1024, help="pages in the KV pool")
  p.add_argument("--page-size", type=int, default=16)


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--max-tokens", type=int, default=64)
  p.add_argument("--temperature", type=float, default=0.0)
  p.add_argument("--top-k", type=int, default=0)
  p.add_argument("--top-p", type=float, default=1.0)
  p.add_argument("--seed", type=int, default=0)


def _build(args):
  """Engine and tokenizer from the command-line model arguments."""
  from tokendance_jax import api

  return api.load_engine(dtype=args.dtype, cache_dir=args.cache_dir,
                         force_kernel=args.force_kernel, num_pages=args.num_pages,
                         page_size=args.page_size)


def _sampling(args):
  from tokendance_jax.sampling import SamplingParams

  return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                        top_k=args.top_k, top_p=args.top_p, seed=args.seed)


def cmd_generate(args) -> int:
  engine, tok = _build(args)
  texts = [tok.apply_chat_template([{"role": "user", "content": p}]) if args.chat else p
           for p in args.prompt]
  prompts = [tok.encode(t) for t in texts]
  start = time.perf_counter()
  results = engine.generate(prompts, _sampling(args), progress=len(prompts) > 1)
  elapsed = time.perf_counter() - start
  for prompt, res in zip(args.prompt, results, strict=True):
    if len(results) > 1:
      print(f"### {prompt}")
    print(tok.decode(res.output_ids), flush=True)
  n = sum(len(r.output_ids) for r in results)
  print(f"[{n} tokens in {elapsed:.2f} s, {len(results)} sequences]", file=sys.stderr)
  return 0


def cmd_demo(args) -> int:
  """A short batched chat demo on the real model."""
  args.prompt = [
      "What is the capital of France?",
      "Name three primary colors.",
      "Write one sentence about the sea.",
      "What is 12 plus 30?",
  ]
  args.chat = True
  return cmd_generate(args)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="tokendance", description=__doc__)
  sub = parser.add_subparsers(dest="command", required=True)

  g = sub.add_parser("generate", help="generate text for one or more prompts")
  g.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
  g.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
  _add_model_args(g)
  _add_sampling_args(g)
  g.set_defaults(func=cmd_generate)

  d = sub.add_parser("demo", help="batched chat demo on the real model")
  _add_model_args(d)
  _add_sampling_args(d)
  d.set_defaults(func=cmd_demo, max_tokens=48)
  return parser


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  try:
    return args.func(args)
  except ValueError as e:  # bad input: a message, not a traceback
    print(f"tokendance: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
