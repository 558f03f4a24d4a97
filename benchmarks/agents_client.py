"""A multi-agent client benchmark: N agents in rounds through `openai.AsyncOpenAI`.

Like the client side of AgentSociety, AutoGen group chat or Du et al.'s debate: all agents of
a round are sent at once (`asyncio.gather`), round r+1 starts when all of round r is back.
Agent i's prompt: a long shared system prompt (a fixed preamble and the debate bank's rules,
`data/workload_debate.json`), its own short persona (a second system message), the shared
question, and from round 2 the other agents' previous answers in index order, never its own,
in one of two styles: "messages" (one user message per other agent, f"{name} said: {text}",
then a shared instruction) or "concat" (one user message, "One agent solution: ```...```"
per other agent, Du et al.).

Each (mode, style) runs on a fresh server over a fresh `Engine` (empty KV pool) on the same
loaded params: `create_app(engine, tok, reuse=MODE, gather_ms=G)`, MODE "none" (no reuse),
"prefix" (automatic prefix caching) or "tokendance" (full reuse); greedy (temperature 0),
fixed `max_tokens`. `--warmup` throwaway runs compile each mode's shapes first.

Same prompts in every mode: "none" runs first and its answers are the transcript; round r's
prompts, in every mode, are built from "none"'s round r-1 answers (a failed request leaves
"(no answer)"). Other modes' answers are only compared with "none"'s: both texts re-encoded
with the in-process tokenizer, matches at equal positions / reference tokens.

Per request: usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens (0 with
`cached_reported: false` when absent), computed = prompt - cached, text, latency, error. Per
round: latency from first send to last answer, and KV pages per agent from `GET /metrics`
polled every `--poll-ms` during the round. Rule (`pages_per_agent`): of the samples holding
both `tokendance_kv_pages_active` and `tokendance_running` with running > 0, keep those at
the round's largest running; the value is their max kv_pages_active / running (else None).
Summaries: token sums and latency sums over all rounds; pages per agent is the mean over
rounds 2+ (the rounds whose prompts hold other agents' answers; round 1 if it is the only
one); token match is matched / reference tokens summed over every round and agent.

  python benchmarks/agents_client.py --agents 16 --rounds 3 --styles messages,concat \\
      --modes none,prefix,tokendance --max-tokens 32 --gather-ms 50 \\
      --json out/agents_client.json --plot out/agents_client.png
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import pathlib
import platform
import sys
import time

from tokendance_jax.workload_text import person_names, text_banks

MODES = ("none", "prefix", "tokendance")
STYLES = ("messages", "concat")
NO_ANSWER = "(no answer)"
UPDATE = ("Using the reasoning from other agents as additional advice, can you give an updated "
          "answer? Examine your solution and that of the other agents step by step.")

PREAMBLE = (
    "The discussion is moderated by a coordinator who collects every answer at the end of a "
    "round and shows it to the other agents at the start of the next one. Each agent sees "
    "the same question and the same rules, and a short description of its own role. Agents "
    "cannot talk to the coordinator, cannot search the web and cannot run code; they can "
    "only reason in writing. The coordinator will compare the final answers of all agents "
    "after the last round and report the answer most of them agree on, together with the "
    "arguments that convinced the others. A good answer is correct, states its assumptions, "
    "checks the arithmetic of each step, and is honest about what remains uncertain. Being "
    "brief is better than repeating what others have already said. Rules of the discussion:")


def system_prompt(n_agents: int, max_chars: int | None = None) -> str:
  """The shared system prompt: a fixed preamble, then the debate bank's rules and hints in
  bank order (~330 SmolLM2 tokens)."""
  bank = text_banks("workload_debate")
  text = " ".join([f"You are one of {n_agents} agents who discuss a question in rounds.",
                   PREAMBLE, *bank["rules"], *bank["hints"]])
  return text if max_chars is None else text[:max_chars]


def persona(i: int, name: str) -> str:
  bank = text_banks("workload_debate")
  roles, styles = bank["roles"], bank["styles"]
  return f"You are {name}, {roles[i % len(roles)]}. {styles[i % len(styles)]}"


def task_question(seed: int = 0) -> str:
  questions = text_banks("workload_debate")["questions"]
  return questions[seed % len(questions)]


def build_messages(style: str, i: int, *, system: str, personas: list[str], names: list[str],
                   question: str, previous: list[str] | None) -> list[dict]:
  """Agent i's chat messages; `previous` is every agent's last-round answer (None: round 1)."""
  msgs = [{"role": "system", "content": system}, {"role": "system", "content": personas[i]},
          {"role": "user", "content": f"Question: {question}"}]
  if previous is None:
    return msgs
  others = [j for j in range(len(previous)) if j != i]
  if style == "messages":
    msgs += [{"role": "user", "content": f"{names[j]} said: {previous[j]}"} for j in others]
    return msgs + [{"role": "user", "content": UPDATE}]
  if style == "concat":
    body = "".join(f"\n\n One agent solution: ```{previous[j]}```" for j in others)
    text = f"These are the solutions to the problem from other agents: {body}\n\n {UPDATE}"
    return msgs + [{"role": "user", "content": text}]
  raise ValueError(f"style {style!r}; expected one of {', '.join(STYLES)}")


def pages_per_agent(samples: list[dict]) -> float | None:
  """Max kv_pages_active / running over the samples at the round's largest running count.

  samples: [{"kv_pages_active": float | None, "running": float | None}]; samples missing
  either gauge or with running <= 0 are ignored. None when no sample qualifies.
  """
  ok = [s for s in samples if s.get("kv_pages_active") is not None
        and s.get("running") is not None and s["running"] > 0]
  if not ok:
    return None
  top = max(s["running"] for s in ok)
  return max(s["kv_pages_active"] / s["running"] for s in ok if s["running"] == top)


def parse_gauges(text: str) -> dict:
  """kv_pages_active and running from Prometheus text (None for a gauge that is absent)."""
  from prometheus_client.parser import text_string_to_metric_families

  found = {"kv_pages_active": None, "running": None}
  for family in text_string_to_metric_families(text):
    for sample in family.samples:
      key = sample.name.removeprefix("tokendance_")
      if key in found:
        found[key] = float(sample.value)
  return found


def token_match(encode, reference: str, text: str) -> tuple[int, int]:
  """(positions where `text`'s ids equal `reference`'s, number of reference ids)."""
  ref, got = encode(reference), encode(text)
  return sum(a == b for a, b in zip(ref, got, strict=False)), len(ref)


async def _poll_metrics(url: str, period_s: float, samples: list[dict], stop: asyncio.Event):
  import httpx

  async with httpx.AsyncClient(base_url=url, timeout=10) as http:
    while not stop.is_set():
      try:
        r = await http.get("/metrics")
        samples.append(parse_gauges(r.text) if r.status_code == 200 else {})
      except Exception as e:  # noqa: BLE001 - a failed poll is a missing sample
        samples.append({"error": f"{type(e).__name__}: {e}"})
      try:
        await asyncio.wait_for(stop.wait(), period_s)
      except TimeoutError:
        pass


async def _ask(client, model: str, messages: list[dict], max_tokens: int) -> dict:
  t0 = time.perf_counter()
  rec = {"start": t0, "error": None}
  try:
    r = await client.chat.completions.create(model=model, messages=messages,
                                             max_tokens=max_tokens, temperature=0.0, seed=0)
    details = getattr(r.usage, "prompt_tokens_details", None)
    cached = getattr(details, "cached_tokens", None) if details is not None else None
    rec.update(prompt_tokens=r.usage.prompt_tokens, cached_tokens=cached or 0,
               cached_reported=cached is not None,
               computed_tokens=r.usage.prompt_tokens - (cached or 0),
               completion_tokens=r.usage.completion_tokens,
               text=r.choices[0].message.content or "",
               # the server's own account of a collective step (absent on other paths)
               step_requests=((r.model_extra or {}).get("tokendance") or {}).get("step_requests"))
  except Exception as e:  # noqa: BLE001 - recorded and counted, the round goes on
    keys = ("prompt_tokens", "cached_tokens", "computed_tokens", "completion_tokens", "text")
    rec.update(dict.fromkeys(keys), cached_reported=False, error=f"{type(e).__name__}: {e}")
  rec["end"] = time.perf_counter()
  rec["latency_s"] = rec["end"] - t0
  return rec


async def run_rounds(url: str, model: str, prompts_for, args) -> list[dict]:
  """Every round on one server; `prompts_for(r, rounds_so_far)` gives round r's messages per
  agent (r = 0 is round 1)."""
  import openai

  client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0,
                              timeout=args.request_timeout)
  rounds = []
  try:
    for r in range(args.rounds):
      prompts = prompts_for(r, rounds)
      samples, stop = [], asyncio.Event()
      poller = asyncio.create_task(_poll_metrics(url, args.poll_ms / 1000, samples, stop))
      recs = await asyncio.gather(*[_ask(client, model, m, args.max_tokens) for m in prompts])
      stop.set()
      await poller
      rounds.append(_round_record(r, recs, samples))
  finally:
    await client.close()
  return rounds


def _round_record(r: int, recs: list[dict], samples: list[dict]) -> dict:
  ok = [x for x in recs if x["error"] is None]
  t0, t1 = min(x["start"] for x in recs), max(x["end"] for x in recs)
  for x in recs:
    del x["start"], x["end"]
  return {"round": r + 1, "requests": recs, "errors": len(recs) - len(ok),
          "prompt_tokens": sum(x["prompt_tokens"] for x in ok),
          "cached_tokens": sum(x["cached_tokens"] for x in ok),
          "computed_tokens": sum(x["computed_tokens"] for x in ok),
          "cached_reported": bool(ok) and all(x["cached_reported"] for x in ok),
          "round_latency_s": t1 - t0, "pages_per_agent": pages_per_agent(samples),
          "metrics_samples": len(samples),
          "step_requests": sorted({x["step_requests"] for x in ok
                                   if x.get("step_requests") is not None})}


def load_model(args):
  """(params, ModelConfig, tokenizer, dtype), loaded once for every server."""
  if args.tiny:
    import jax

    from tokendance_jax import model
    from tokendance_jax.config import TINY
    from tokendance_jax.serve.testing import ByteTokenizer

    cfg = dataclasses.replace(TINY, max_seq_len=8192)  # byte tokens: long prompts; RoPE only
    return model.init_params(cfg, jax.random.PRNGKey(0)), cfg, ByteTokenizer(), "float32"
  from tokendance_jax import api
  from tokendance_jax.config import default_cache_dtype

  dtype = args.dtype or default_cache_dtype()
  params, cfg, tok = api.load_model(dtype=dtype)
  return params, cfg, tok, dtype


def make_app(loaded, mode: str, args):
  """A fresh Engine (empty KV pool) over the loaded params, served with reuse=mode."""
  from tokendance_jax import serve
  from tokendance_jax.config import AttentionConfig, CacheConfig
  from tokendance_jax.engine import Engine

  params, cfg, tok, dtype = loaded
  cache_cfg = CacheConfig(num_pages=args.num_pages, page_size=args.page_size, dtype=dtype)
  engine = Engine(params, cfg, cache_cfg=cache_cfg, attn=AttentionConfig.default_for_backend(),
                  max_batch=max(args.agents, 1))
  return serve.create_app(engine, tok, model_name=args.model_name, reuse=mode,
                          gather_ms=args.gather_ms, **args.server)


def run_one(loaded, mode: str, style: str, prompts_for, args, label: str = "") -> dict:
  """One (mode, style) on its own server: {"status", "error", "errors", "rounds"}."""
  from tokendance_jax.serve import BackgroundServer

  try:
    server = BackgroundServer(make_app(loaded, mode, args))
    server.__enter__()
  except Exception as e:  # noqa: BLE001 - reported as a failed mode, never skipped silently
    print(f"[{label}{mode}/{style}] server failed to start: {type(e).__name__}: {e}", flush=True)
    return {"status": "server_failed", "error": f"{type(e).__name__}: {e}", "errors": 0,
            "rounds": []}
  try:
    rounds = asyncio.run(run_rounds(server.url, args.model_name, prompts_for, args))
  finally:
    server.__exit__(None, None, None)
  for rd in rounds:
    print(f"[{label}{mode}/{style}] round {rd['round']}: computed {rd['computed_tokens']} of "
          f"{rd['prompt_tokens']} prompt tokens, {rd['round_latency_s']:.2f} s, pages/agent "
          f"{rd['pages_per_agent']}, errors {rd['errors']}, collective steps of "
          f"{rd['step_requests']}", flush=True)
  return {"status": "ok", "error": None, "errors": sum(rd["errors"] for rd in rounds),
          "rounds": rounds}


def run_style(loaded, style: str, modes: list[str], args, kept: dict | None = None) -> dict:
  """Every mode on one style, "none" first; later rounds' prompts from "none"'s answers."""
  tok = loaded[2]
  n = args.agents
  names = person_names(0, n)
  system = system_prompt(n, max_chars=160 if args.tiny else None)
  personas = [persona(i, names[i]) for i in range(n)]
  question = task_question(args.seed)
  transcript: list[list[str]] = []  # "none"'s answers per round

  def prompts(previous: list[str] | None) -> list[list[dict]]:
    return [build_messages(style, i, system=system, personas=personas, names=names,
                           question=question, previous=previous) for i in range(n)]

  def reference_prompts(r: int, done: list[dict]):  # "none": from its own last answers
    return prompts(None if r == 0 else answers(done[r - 1]))

  def replay_prompts(r: int, done: list[dict]):  # other modes: from "none"'s answers
    return prompts(None if r == 0 else (transcript[r - 1] if r - 1 < len(transcript)
                                        else [NO_ANSWER] * n))

  runs = dict(kept or {})
  if "none" in runs:
    transcript = [answers(rd) for rd in runs["none"]["rounds"]]
  for mode in [m for m in modes if m not in runs]:
    prompts_for = reference_prompts if mode == "none" else replay_prompts
    for _ in range(args.warmup):  # compiles this mode's shapes on a throwaway server
      run_one(loaded, mode, style, prompts_for, args, label="warmup ")
    runs[mode] = run_one(loaded, mode, style, prompts_for, args)
    if mode == "none":
      transcript = [answers(rd) for rd in runs[mode]["rounds"]]
  _add_token_match(runs, lambda text: tok.encode_parts([(text, False)]))  # text as text
  return runs


def answers(rd: dict) -> list[str]:
  return [x["text"] if x["error"] is None else NO_ANSWER for x in rd["requests"]]


def _add_token_match(runs: dict, encode) -> None:
  ref = runs.get("none", {}).get("rounds", [])
  for run in runs.values():
    for r, rd in enumerate(run["rounds"]):
      same, total = 0, 0
      for i, x in enumerate(rd["requests"]):
        if r < len(ref) and x["error"] is None and ref[r]["requests"][i]["error"] is None:
          m, t = token_match(encode, ref[r]["requests"][i]["text"], x["text"])
          same, total = same + m, total + t
      rd["token_match"], rd["token_match_counts"] = (same / total if total else None), [same, total]


def _ratio(a, b):
  return None if a is None or b is None or b == 0 else a / b


def _mean(xs):
  xs = [x for x in xs if x is not None]
  return sum(xs) / len(xs) if xs else None


def summarize(runs: dict) -> tuple[dict, dict, dict]:
  """(summary[mode][style], ratios[style], targets[style]) from runs[style][mode]."""
  summary = {}
  for style, by_mode in runs.items():
    for mode, run in by_mode.items():
      rds = run["rounds"]
      same, total = (sum(rd["token_match_counts"][k] for rd in rds) for k in (0, 1))
      summary.setdefault(mode, {})[style] = {
          "status": run["status"], "errors": run["errors"],
          **{k: sum(rd[k] for rd in rds) if rds else None
             for k in ("prompt_tokens", "cached_tokens", "computed_tokens", "round_latency_s")},
          "pages_per_agent": _mean(rd["pages_per_agent"] for rd in rds[1:] or rds),
          "token_match": same / total if total else None}
  ratios, targets = {}, {}
  for style in runs:
    def get(mode, key, style=style):
      return summary.get(mode, {}).get(style, {}).get(key)
    ratios[style] = {
        "tokendance_over_prefix_computed": _ratio(get("tokendance", "computed_tokens"),
                                                  get("prefix", "computed_tokens")),
        "prefix_over_none_computed": _ratio(get("prefix", "computed_tokens"),
                                            get("none", "computed_tokens")),
        "tokendance_over_prefix_pages_per_agent": _ratio(get("tokendance", "pages_per_agent"),
                                                         get("prefix", "pages_per_agent")),
        "tokendance_over_prefix_latency": _ratio(get("tokendance", "round_latency_s"),
                                                 get("prefix", "round_latency_s")),
        "token_match": {m: get(m, "token_match") for m in summary}}
    q = ratios[style]
    targets[style] = {
        "tokendance_computed_le_0.40x_prefix": _target(q["tokendance_over_prefix_computed"],
                                                       "<=", 0.40),
        "tokendance_pages_per_agent_le_1/3_prefix": _target(
            q["tokendance_over_prefix_pages_per_agent"], "<=", 1 / 3),
        "tokendance_token_match_ge_0.95": _target(get("tokendance", "token_match"), ">=", 0.95),
        "tokendance_latency_le_prefix": _target(q["tokendance_over_prefix_latency"], "<=", 1.0),
        "prefix_computed_lt_0.60x_none": _target(q["prefix_over_none_computed"], "<", 0.60)}
  return summary, ratios, targets


def _target(value, op: str, bound: float) -> dict:
  if value is None:
    return {"value": None, "op": op, "bound": bound, "pass": False, "note": "no data"}
  ok = {"<=": value <= bound, "<": value < bound, ">=": value >= bound}[op]
  return {"value": value, "op": op, "bound": bound, "pass": bool(ok)}


def print_table(result: dict) -> None:
  print(f"{'mode':<11} {'style':<9} {'computed':>9} {'prompt':>8} {'cached':>8} "
        f"{'latency':>8} {'pages/ag':>8} {'match':>6} {'errors':>6}")
  for mode, by_style in result["summary"].items():
    for style, s in by_style.items():
      def f(v, spec):
        return "-" if v is None else format(v, spec)
      print(f"{mode:<11} {style:<9} {f(s['computed_tokens'], '9d')} {f(s['prompt_tokens'], '8d')} "
            f"{f(s['cached_tokens'], '8d')} {f(s['round_latency_s'], '8.2f')} "
            f"{f(s['pages_per_agent'], '8.2f')} {f(s['token_match'], '6.3f')} {s['errors']:>6}"
            + ("" if s["status"] == "ok" else f"  ({s['status']})"))
  for style, checks in result["targets"].items():
    for name, t in checks.items():
      v = "-" if t["value"] is None else f"{t['value']:.3f}"
      print(f"target [{style}] {name}: {v} -> {'PASS' if t['pass'] else 'FAIL'}")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  for flag, kind, default in (
      ("--agents", int, 16), ("--rounds", int, 3), ("--styles", str, "messages,concat"),
      ("--modes", str, "none,prefix,tokendance"), ("--max-tokens", int, 32),
      ("--gather-ms", float, 50.0), ("--num-pages", int, 2048), ("--page-size", int, 16),
      ("--poll-ms", float, 75.0), ("--request-timeout", float, 600.0), ("--seed", int, 0)):
    p.add_argument(flag, type=kind, default=default)
  p.add_argument("--warmup", type=int, default=1, help="throwaway runs per mode and style first")
  p.add_argument("--dtype", default=None)
  p.add_argument("--tiny", action="store_true", help="tiny random model (tests)")
  p.add_argument("--keep-from", type=pathlib.Path, default=None,
                 help="an earlier run's JSON (same config): modes not in --rerun are taken "
                      "from it, not run again")
  p.add_argument("--rerun", default="tokendance",
                 help="with --keep-from: the modes to run again (comma-separated)")
  p.add_argument("--server", action="append", default=[], metavar="FIELD=VALUE",
                 help="a ServerConfig field for every server, e.g. chat_recompute=0.6 "
                      "(repeatable)")
  p.add_argument("--json", type=pathlib.Path, default=None)
  p.add_argument("--plot", type=pathlib.Path, default=None)
  args = p.parse_args(argv)
  args.styles = [s for s in args.styles.split(",") if s]
  args.modes = [m for m in args.modes.split(",") if m]
  bad = [s for s in args.styles if s not in STYLES] + [m for m in args.modes if m not in MODES]
  if bad or args.agents < 1 or args.rounds < 1:
    p.error(f"unknown styles/modes {bad}, or agents/rounds below 1")
  if "none" not in args.modes:
    print("note: adding mode 'none', the reference transcript for every mode", flush=True)
  args.modes = ["none", *[m for m in args.modes if m != "none"]]
  args.model_name = "tiny" if args.tiny else "SmolLM2-135M-Instruct"
  args.rerun = [m for m in args.rerun.split(",") if m]
  args.server = server_overrides(p, args.server)
  return args


def server_overrides(p, items: list[str]) -> dict:
  """--server FIELD=VALUE pairs as ServerConfig overrides, each value of its field's type."""
  from tokendance_jax.serve.config import ServerConfig

  fields = {f.name: type(getattr(ServerConfig(), f.name))
            for f in dataclasses.fields(ServerConfig)}
  out = {}
  for item in items:
    name, sep, value = item.partition("=")
    if not sep or name not in fields or fields[name] not in (int, float, str):
      p.error(f"--server {item!r}: expected FIELD=VALUE with FIELD an int, float or str "
              f"field of ServerConfig")
    try:
      out[name] = fields[name](value)
    except ValueError:
      p.error(f"--server {item!r}: {value!r} is not a {fields[name].__name__}")
  try:
    ServerConfig(**out)
  except ValueError as e:
    p.error(f"--server: {e}")
  return out


def _kept_runs(args) -> dict:
  """Runs of modes not re-run, from --keep-from (same config): {style: {mode: run}}."""
  if args.keep_from is None:
    return {}
  old = json.loads(args.keep_from.read_text())
  same = ("agents", "rounds", "max_tokens", "seed", "num_pages", "page_size", "tiny")
  diff = [k for k in same if old["config"].get(k) != getattr(args, k)]
  if diff:
    raise SystemExit(f"--keep-from {args.keep_from}: its config differs in {diff}")
  keep = [m for m in MODES if m not in args.rerun]
  print(f"note: modes {keep} taken from {args.keep_from}", flush=True)
  return {style: {m: run for m, run in old["runs"][style].items() if m in keep}
          for style in args.styles}


def main(argv=None) -> dict:
  args = parse_args(argv)
  loaded = load_model(args)
  kept = _kept_runs(args)
  runs = {style: run_style(loaded, style, args.modes, args, kept.get(style))
          for style in args.styles}
  summary, ratios, targets = summarize(runs)
  config = {k: str(v) if isinstance(v, pathlib.Path) else v
            for k, v in vars(args).items() if k not in ("json", "plot")}
  result = {"config": {**config, "model": args.model_name, "platform": platform.platform()},
            "runs": runs, "summary": summary, "ratios": ratios, "targets": targets,
            "errors": {m: sum(runs[s][m]["errors"] for s in runs) for m in args.modes},
            "failed_servers": [f"{m}/{s}" for s in runs for m in runs[s]
                               if runs[s][m]["status"] != "ok"]}
  if args.json:
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
  if args.plot:
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    from agents_client_plot import plot

    plot(result, args.plot)
  print_table(result)
  return result


if __name__ == "__main__":
  main()
