"""The `tokendance serve` subcommand: the OpenAI-compatible + rounds server on the real model.

`cli.py` wires it in with `serve_cli.add_parser(subparsers)`; the parser's
`func` default runs `cmd_serve(args)`.
"""

from __future__ import annotations

import argparse

from tokendance_jax.rounds import MASTERS
from tokendance_jax.serve.config import REUSE_MODES


def add_parser(subparsers) -> argparse.ArgumentParser:
  """Add `serve` to an argparse subparsers object; returns the new parser."""
  p = subparsers.add_parser("serve", help="serve the OpenAI-compatible API and the rounds API")
  p.add_argument("--host", default="127.0.0.1",
                 help="interface to bind (default 127.0.0.1: this machine only)")
  p.add_argument("--port", type=int, default=8000)
  p.add_argument("--api-key", default=None,
                 help="require 'Authorization: Bearer KEY' on every /v1 request")
  p.add_argument("--model-name", default=None, help="the model id clients must send")
  p.add_argument("--max-batch", type=int, default=32, help="sequences decoding at once")
  p.add_argument("--max-queue", type=int, default=256,
                 help="requests waiting beyond the running batch; past it: 429")
  p.add_argument("--session-pages", type=int, default=512, help="KV pages of each session's pool")
  p.add_argument("--max-sessions", type=int, default=8)
  p.add_argument("--state-dir", default=None,
                 help="snapshot sessions here (orbax) on shutdown and POST /v1/snapshots; "
                      "the newest snapshot is restored on start")
  p.add_argument("--log-level", default="info",
                 choices=["critical", "error", "warning", "info", "debug"])
  p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                 help="weights and K/V (default: bfloat16 on GPU, float32 elsewhere)")
  p.add_argument("--cache-dir", default=None, help="where converted weights are cached (orbax)")
  p.add_argument("--force-kernel", action="store_true",
                 help="use the Pallas kernels on CPU too (interpret mode; slow)")
  p.add_argument("--num-pages", type=int, default=1024, help="pages in the engine's KV pool")
  p.add_argument("--page-size", type=int, default=16)
  p.add_argument("--reuse", default="prefix", choices=list(REUSE_MODES),
                 help="K/V reuse on the engine's pool: none, prefix (default: automatic prefix "
                      "caching) or tokendance (prefix caching, and chats waiting together share "
                      "spans found by content in one collective step)")
  p.add_argument("--gather-ms", type=float, default=50.0,
                 help="a collective step starts once no chat arrived for this long (at most "
                      "10x after the first)")
  p.add_argument("--chat-recompute", type=float, default=0.30,
                 help="fraction of each chat's shared tokens recomputed (tokendance)")
  p.add_argument("--chat-masters", default="context", choices=list(MASTERS),
                 help="how shared spans without a master get one: context (default: in one "
                      "prefill, in their order), anchored or decode")
  p.set_defaults(func=cmd_serve)
  return p


def server_kwargs(args) -> dict:
  """Keyword arguments of `tokendance_jax.serve.serve` from parsed arguments."""
  kw = dict(host=args.host, port=args.port, dtype=args.dtype, cache_dir=args.cache_dir,
            num_pages=args.num_pages, page_size=args.page_size, max_batch=args.max_batch,
            force_kernel=args.force_kernel, log_level=args.log_level, api_key=args.api_key,
            max_queue=args.max_queue, session_pages=args.session_pages,
            max_sessions=args.max_sessions, state_dir=args.state_dir,
            chat_masters=args.chat_masters, reuse=args.reuse, gather_ms=args.gather_ms,
            chat_recompute=args.chat_recompute)
  if args.model_name:
    kw["model_name"] = args.model_name
  return kw


def cmd_serve(args) -> int:
  from tokendance_jax.serve import ServerConfig, serve

  kw = server_kwargs(args)
  config_keys = ("api_key", "max_queue", "session_pages", "max_sessions", "model_name",
                 "state_dir", "chat_masters", "reuse", "gather_ms", "chat_recompute")
  ServerConfig(**{k: kw[k] for k in config_keys if k in kw})  # bad values fail before loading
  if not 0 < args.port < 65536:
    raise ValueError(f"--port {args.port} must be in 1..65535")
  serve(**kw)
  return 0


def main(argv=None) -> int:
  """Standalone entry (until cli.py wires `serve` in): `python -m tokendance_jax.serve_cli`."""
  parser = argparse.ArgumentParser(prog="tokendance")
  add_parser(parser.add_subparsers(dest="command", required=True))
  args = parser.parse_args(["serve", *(argv or [])] if argv is not None else None)
  return args.func(args)


if __name__ == "__main__":
  import sys

  sys.exit(main(sys.argv[1:]))
