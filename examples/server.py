"""Serve SmolLM2-135M-Instruct over HTTP: OpenAI-compatible endpoints plus the rounds API.

  python examples/server.py --port 8000 [--api-key KEY]

Then point any OpenAI client at http://127.0.0.1:8000/v1, e.g.

  from openai import OpenAI
  client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="x")
  client.chat.completions.create(model="SmolLM2-135M-Instruct",
                                 messages=[{"role": "user", "content": "Hi!"}])

and run multi-agent rounds with POST /v1/sessions, POST /v1/sessions/{id}/rounds. An
unmodified multi-agent app pointed at it gets collective reuse on its concurrent chats
(`--reuse tokendance`, the default; `--gather-ms` sets how long a chat waits for others).
"""

import argparse
import sys

from tokendance_jax import serve_cli
from tokendance_jax.serve import serve


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command")
  serve_cli.add_parser(sub)
  args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
  serve(**serve_cli.server_kwargs(args))
  return 0


if __name__ == "__main__":
  sys.exit(main())
