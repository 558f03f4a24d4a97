"""Load test of the HTTP server: many concurrent OpenAI clients plus rounds sessions.

Starts the server in-process on the real model (or targets `--url`), then
fires `--requests` chat / completion requests (half of them streamed) from
`--clients` concurrent clients, while `--sessions` rounds sessions run
`--rounds` rounds each. Records outcomes by status code, latency
percentiles, generated tokens per second and the pages left in use
afterwards (leaks), and writes JSON and a latency plot.

  python benchmarks/server_load.py --clients 64 --requests 256 --max-tokens 16 \\
      --json docs/results/server_load.json --plot docs/results/server_load.png
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import pathlib
import platform
import time

import httpx
import numpy as np

TOPICS = ("the sea", "a red bicycle", "winter mornings", "prime numbers", "old maps",
          "a quiet library", "thunderstorms", "tea")


async def _request(client, i: int, model: str, max_tokens: int) -> dict:
  stream = i % 2 == 1
  topic = TOPICS[i % len(TOPICS)]
  if i % 4 < 2:
    path = "/v1/chat/completions"
    body = {"messages": [{"role": "user", "content": f"Write one sentence about {topic}."}]}
  else:
    path = "/v1/completions"
    body = {"prompt": f"A short note about {topic}:"}
  body.update(model=model, max_tokens=max_tokens, temperature=0.7, seed=i, stream=stream)
  if stream:
    body["stream_options"] = {"include_usage": True}
  t0 = time.perf_counter()
  r = await client.post(path, json=body)
  text = r.text
  tokens = 0
  if r.status_code == 200 and not stream:
    tokens = r.json()["usage"]["completion_tokens"]
  elif r.status_code == 200:  # the usage chunk (stream_options.include_usage) comes last
    payloads = [json.loads(line[6:]) for line in text.split("\n")
                if line.startswith("data: {")]
    tokens = next(p["usage"]["completion_tokens"] for p in reversed(payloads) if p.get("usage"))
  return {"i": i, "status": r.status_code, "seconds": time.perf_counter() - t0,
          "tokens": tokens, "stream": stream}


async def _session(client, k: int, rounds: int, max_tokens: int) -> dict:
  body = {"system": "Three neighbours plan a street party.",
          "agents": {"ann": "You bake.", "bob": "You play music.", "cy": "You organise."},
          "max_tokens": max_tokens, "seed": k}
  t0 = time.perf_counter()
  r = await client.post("/v1/sessions", json=body)
  if r.status_code != 200:
    return {"status": r.status_code, "seconds": time.perf_counter() - t0, "rounds": 0}
  sid = r.json()["id"]
  done = 0
  try:
    for j in range(rounds):
      rr = await client.post(f"/v1/sessions/{sid}/rounds", json={"message": f"Step {j}."})
      if rr.status_code != 200:
        return {"status": rr.status_code, "seconds": time.perf_counter() - t0, "rounds": done}
      done += 1
  finally:
    await client.delete(f"/v1/sessions/{sid}")
  return {"status": 200, "seconds": time.perf_counter() - t0, "rounds": done}


async def _load(url: str, args) -> tuple[list[dict], list[dict], float]:
  limits = httpx.Limits(max_connections=args.clients + args.sessions,
                        max_keepalive_connections=args.clients + args.sessions)
  async with httpx.AsyncClient(base_url=url, timeout=args.timeout, limits=limits) as client:
    model = (await client.get("/v1/models")).json()["data"][0]["id"]
    sem = asyncio.Semaphore(args.clients)
    from tqdm import tqdm

    bar = tqdm(total=args.requests, unit="req", desc="requests")

    async def one(i):
      async with sem:
        out = await _request(client, i, model, args.max_tokens)
        bar.update(1)
        return out

    t0 = time.perf_counter()
    results = await asyncio.gather(
        asyncio.gather(*(one(i) for i in range(args.requests))),
        asyncio.gather(*(_session(client, k, args.rounds, args.max_tokens)
                         for k in range(args.sessions))))
    bar.close()
    return results[0], results[1], time.perf_counter() - t0


def run(args) -> dict:
  server = worker = None
  url = args.url
  if url is None:
    from tokendance_jax import api
    from tokendance_jax.serve import BackgroundServer, create_app

    engine, tok = api.load_engine(num_pages=args.num_pages, max_batch=args.max_batch)
    app = create_app(engine, tok, max_queue=args.max_queue, session_pages=args.session_pages)
    worker = app.state.worker
    server = BackgroundServer(app).__enter__()
    url = server.url
  try:
    reqs, sessions, wall = asyncio.run(_load(url, args))
    with httpx.Client(base_url=url) as c:
      healthy = c.get("/health").status_code == 200
  finally:
    leaked = None
    if worker is not None:
      e = worker.engine
      leaked = {**worker.pool_accounting(),  # unaccounted: pages no sequence or cache holds
                "session_pages_in_use": worker.session_pages_used(),
                "running": len(e.running), "waiting": len(e.waiting)}
    if server is not None:
      server.__exit__(None, None, None)
  codes = collections.Counter(r["status"] for r in reqs)
  ok = [r for r in reqs if r["status"] == 200]
  lat = np.array([r["seconds"] for r in ok]) if ok else np.zeros(1)
  tokens = sum(r["tokens"] for r in ok)
  return {
      "experiment": "server_load", "model": "SmolLM2-135M-Instruct",
      "url": args.url or "in-process",
      "machine": platform.machine(), "clients": args.clients, "requests": args.requests,
      "max_tokens": args.max_tokens, "max_batch": args.max_batch, "max_queue": args.max_queue,
      "wall_seconds": wall, "status_counts": {str(k): v for k, v in sorted(codes.items())},
      "errors": sum(v for k, v in codes.items() if k != 200 and k != 429),
      "rejected_429": codes.get(429, 0), "generated_tokens": tokens,
      "tokens_per_second": tokens / wall,
      "latency_seconds": {"p50": float(np.percentile(lat, 50)),
                          "p95": float(np.percentile(lat, 95)),
                          "p99": float(np.percentile(lat, 99)), "max": float(lat.max())},
      "sessions": {"count": args.sessions, "rounds_each": args.rounds,
                   "completed": sum(s["status"] == 200 for s in sessions),
                   "rounds_done": sum(s["rounds"] for s in sessions),
                   "seconds": [s["seconds"] for s in sessions]},
      "healthy_after": healthy, "leaks_after": leaked, "raw": reqs,
  }


def plot(result: dict, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  ok = [r for r in result["raw"] if r["status"] == 200]
  fig, ax = plt.subplots(figsize=(6.5, 3.8))
  for stream in (False, True):
    lat = np.sort([r["seconds"] for r in ok if r["stream"] == stream])
    if lat.size:
      ax.plot(lat, np.arange(1, lat.size + 1) / lat.size, label="stream" if stream else "plain")
  ax.set_xlabel("request latency (s)")
  ax.set_ylabel("fraction of requests")
  ax.grid(alpha=0.3)
  ax.legend()
  ax.set_title(f"{result['requests']} requests, {result['clients']} concurrent clients, "
               f"{result['errors']} errors, {result['rejected_429']} x 429", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--url", default=None, help="a running server; default: start one in-process")
  p.add_argument("--clients", type=int, default=64)
  p.add_argument("--requests", type=int, default=256)
  p.add_argument("--sessions", type=int, default=4)
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--max-tokens", type=int, default=16)
  p.add_argument("--max-batch", type=int, default=32)
  p.add_argument("--max-queue", type=int, default=256)
  p.add_argument("--num-pages", type=int, default=1024)
  p.add_argument("--session-pages", type=int, default=256)
  p.add_argument("--timeout", type=float, default=600)
  p.add_argument("--json", default="out/server_load.json")
  p.add_argument("--plot", default="out/server_load.png")
  args = p.parse_args()
  for name in ("clients", "requests", "max_tokens", "max_batch"):
    if getattr(args, name) < 1:
      p.error(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1")
  result = run(args)
  pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
  pathlib.Path(args.json).write_text(json.dumps(result, indent=1))
  plot(result, args.plot)
  summary = {k: result[k] for k in ("status_counts", "errors", "rejected_429", "wall_seconds",
                                    "tokens_per_second", "latency_seconds", "sessions",
                                    "healthy_after", "leaks_after")}
  summary["sessions"] = {k: v for k, v in summary["sessions"].items() if k != "seconds"}
  print(json.dumps(summary, indent=1))
  print(f"wrote {args.json} and {args.plot}")


if __name__ == "__main__":
  main()
