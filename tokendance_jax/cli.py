"""The `tokendance` command line: generate text (and, later, rounds, benchmarks, serving)."""

from __future__ import annotations

import argparse
import sys
import time

from tokendance_jax.rounds import MASTERS


def _add_model_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                 help="parameter and KV-cache dtype (default: bfloat16 on GPU, float32 "
                      "elsewhere, where it is faster)")
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


def prompt_ids(tok, prompts: list[str], chat: bool) -> list[list[int]]:
  """Token ids of each prompt. With `chat`, a user turn of the chat template whose text is
  encoded as text (a special-token string in it never becomes a control token); without,
  the raw prompt as written, templates included."""
  if chat:
    return [tok.encode_chat([{"role": "user", "content": p}]) for p in prompts]
  return [tok.encode(p) for p in prompts]


def cmd_generate(args) -> int:
  sampling_params = _sampling(args)  # bad values fail before the model loads
  engine, tok = _build(args)
  prompts = prompt_ids(tok, args.prompt, args.chat)
  start = time.perf_counter()
  results = engine.generate(prompts, sampling_params, progress=len(prompts) > 1)
  elapsed = time.perf_counter() - start
  for prompt, res in zip(args.prompt, results, strict=True):
    if len(results) > 1:
      print(f"### {prompt}")
    print(tok.decode(res.output_ids), flush=True)
  n = sum(len(r.output_ids) for r in results)
  print(f"[{n} tokens in {elapsed:.2f} s, {len(results)} sequences]", file=sys.stderr)
  return 0


def _round_config(args, method: str):
  from tokendance_jax.roundrun import RoundRunConfig

  return RoundRunConfig(method=method, preset=args.preset, agents=args.agents, rounds=args.rounds,
                        select=args.select, recompute=args.recompute,
                        check_layer=args.check_layer, epic_k=args.epic_k, tau=args.tau,
                        masters=args.masters, seed=args.seed,
                        order=args.order, max_tokens=args.max_tokens,
                        quality=not args.no_quality)


def _model_and_pool(args):
  from tokendance_jax import api
  from tokendance_jax.config import AttentionConfig, CacheConfig, default_cache_dtype

  dtype = args.dtype or default_cache_dtype()
  params, cfg, tok = api.load_model(dtype=dtype, cache_dir=args.cache_dir)
  cache_cfg = CacheConfig(num_pages=args.num_pages, page_size=args.page_size, dtype=dtype)
  return params, cfg, tok, cache_cfg, AttentionConfig.default_for_backend(
      force_kernel=args.force_kernel)


def cmd_round(args) -> int:
  import json
  import pathlib

  from tokendance_jax import sharding
  from tokendance_jax.roundrun import run_rounds

  mesh = sharding.make_mesh(args.mesh) if args.mesh else None  # bad specs fail before loading
  params, cfg, tok, cache_cfg, attn = _model_and_pool(args)
  result = run_rounds(params, cfg, tok, _round_config(args, args.method), cache_cfg=cache_cfg,
                      attn=attn, progress=True, mesh=mesh)
  for row in result["rounds"]:
    q = row.get("quality", {})
    print(f"round {row['round']}: prefill {row['prefill_seconds']:.2f} s, round "
          f"{row['round_seconds']:.2f} s, KV/agent {row['kv_bytes_per_agent'] / 2**20:.2f} MiB "
          f"(shared region {row['shared_kv_bytes_per_agent'] / 2**20:.2f} MiB), pages "
          f"{row['pages_in_use']}, computed {100 * row['stats']['computed_fraction']:.0f}%"
          + (f", top-1 {q['top1_agreement']:.3f}, KL {q['mean_kl']:.4f}" if "mean_kl" in q else ""))
  if args.json:
    pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.json}")
  return 0


def _add_round_args(p: argparse.ArgumentParser, agents: int, rounds: int,
                    quality_flag: bool = True) -> None:
  p.add_argument("--preset", default="debate",
                 choices=["debate", "generative_agents", "agent_society"])
  p.add_argument("--agents", type=int, default=agents)
  p.add_argument("--rounds", type=int, default=rounds)
  p.add_argument("--select", default="block", choices=["cacheblend", "block", "epic"],
                 help="block (whole pages, default), cacheblend (tokens) or epic")
  p.add_argument("--recompute", type=float, default=0.05,
                 help="fraction of each agent's shared tokens to recompute (default 0.05)")
  p.add_argument("--check-layer", type=int, default=1)
  p.add_argument("--epic-k", type=int, default=16)
  p.add_argument("--tau", type=float, default=None,
                 help="threshold mode: recompute only what deviates more than TAU relative to "
                      "the key norm at the check layer, capped by --recompute")
  p.add_argument("--masters", default="context", choices=list(MASTERS),
                 help="how masters are made: context (default; one prefill of the round's new "
                      "shared segments in prompt order), anchored (each alone after the system "
                      "prompt) or decode (outputs from their authors' decode K/V)")
  p.add_argument("--order", default=None,
                 choices=["canonical", "rotate_to_self", "random_per_agent"])
  p.add_argument("--max-tokens", type=int, default=None, help="override output lengths")
  p.add_argument("--seed", type=int, default=0)
  if quality_flag:
    p.add_argument("--no-quality", action="store_true", help="skip the full-recompute reference")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="tokendance", description=__doc__)
  sub = parser.add_subparsers(dest="command", required=True)

  g = sub.add_parser("generate", help="generate text for one or more prompts")
  g.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
  g.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
  _add_model_args(g)
  _add_sampling_args(g)
  g.set_defaults(func=cmd_generate)

  r = sub.add_parser("round", help="run multi-agent rounds with one method, write JSON")
  r.add_argument("--method", default="tokendance",
                 choices=["full", "prefix", "cacheblend", "epic", "tokendance"])
  r.add_argument("--json", default=None, help="write the per-round results here")
  r.add_argument("--mesh", default=None,
                 help='shard over devices, e.g. "data=2" or "data=2,model=3"')
  _add_round_args(r, agents=6, rounds=3)
  _add_model_args(r)
  r.set_defaults(func=cmd_round)

  from tokendance_jax import serve_cli
  from tokendance_jax.eval import bench

  serve_cli.add_parser(sub)
  bench.add_parser(sub)

  from tokendance_jax import demo

  d = sub.add_parser("demo", help="a multi-agent run on the real model: tokendance beside prefix "
                                  "caching, judged against full recompute",
                     description=demo.__doc__.split("\n\n")[0])
  _add_round_args(d, agents=demo.DEFAULTS["agents"], rounds=demo.DEFAULTS["rounds"],
                  quality_flag=False)
  d.add_argument("--page-size", type=int, default=16)
  d.add_argument("--eval-agents", type=int, help="agents whose outputs are teacher-forced "
                 "against full recompute (default 4)")
  d.set_defaults(func=demo.cmd_demo, **demo.DEFAULTS)
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
