"""Run multi-agent rounds on a mesh spanning several processes (one per host).

Every process runs this same script with its own --process-id; they meet at
the coordinator (`jax.distributed.initialize`), build one global mesh over
all processes' devices and run the same rounds in lockstep (SPMD: each
process feeds the same host values; each device computes its shards).
Process 0 writes the outputs as JSON.

CPU, two processes on one machine (2 devices each, a data=2,model=2 mesh):

  python examples/multihost_round.py --process-id 0 --num-processes 2 --local-devices 2 \\
      --mesh data=2,model=2 --json out/mh.json &
  python examples/multihost_round.py --process-id 1 --num-processes 2 --local-devices 2 \\
      --mesh data=2,model=2

With --num-processes 1 it is the single-process reference; --methods runs
several methods one after another. The model is the random-weight TINY
config unless --real (SmolLM2, debate preset). On TPU slices and under
Slurm / Open MPI pass --auto-cluster instead of the process arguments. See
docs/scale_out.md for GPU nodes and TPU slices.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--process-id", type=int, default=0)
  p.add_argument("--num-processes", type=int, default=1)
  p.add_argument("--coordinator", default="localhost:12355", help="host:port of process 0")
  p.add_argument("--auto-cluster", action="store_true",
                 help="TPU slice / Slurm / Open MPI: jax.distributed.initialize() finds the rest")
  p.add_argument("--local-devices", type=int, default=None,
                 help="CPU only: devices per process (--xla_force_host_platform_device_count)")
  p.add_argument("--mesh", default=None, help='e.g. "data=2,model=2"; default: one device')
  p.add_argument("--methods", default="tokendance", help="comma-separated, run one after another")
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--agents", type=int, default=3)
  p.add_argument("--max-tokens", type=int, default=5)
  p.add_argument("--recompute", type=float, default=0.3)
  p.add_argument("--real", action="store_true", help="SmolLM2 on the debate preset")
  p.add_argument("--json", default=None, help="process 0 writes the result here")
  return p.parse_args(argv)


def init_jax(args):
  """Set the device count, then join the other processes (before any other jax use)."""
  if args.local_devices:
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = (f"{flags} --xla_force_host_platform_device_count="
                               f"{args.local_devices}").strip()
  import jax

  if args.auto_cluster:
    jax.distributed.initialize()
  elif args.num_processes > 1:
    if args.local_devices:  # CPU processes talk through gloo (the default in jax 0.10)
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.num_processes, process_id=args.process_id)
  return jax


def tiny_rounds(session, *, agents: int, rounds: int, max_tokens: int) -> list[dict]:
  """System prompt shared, persona private, every agent's last output shared."""
  import numpy as np

  from tokendance_jax.rounds import AgentPrompt, Round, Segment

  rng = np.random.default_rng(0)
  vocab = session.cfg.vocab_size
  system = Segment(tuple(int(t) for t in rng.integers(3, vocab, 37)), True, "system")
  personas = [Segment(tuple(int(t) for t in rng.integers(3, vocab, int(rng.integers(5, 30)))),
                      False, f"persona{i}") for i in range(agents)]
  prev, out = None, []
  for r in range(rounds):
    prompts = []
    for i in range(agents):
      segs = [system, personas[i]]
      segs += [Segment(tuple(prev[f"a{j}"]), True, f"out{j}")
               for j in range(agents) if prev and prev[f"a{j}"]]
      segs.append(Segment((5, 6, 7, 8 + i, 9 + r), False, "tail"))
      prompts.append(AgentPrompt(f"a{i}", segs, max_tokens=max_tokens))
    res = session.run_round(Round(prompts))
    prev = res.outputs
    out.append(res.to_json())
  return out


def run_methods(methods, *, mesh=None, real: bool = False, agents: int = 3, rounds: int = 2,
                max_tokens: int = 5, recompute: float = 0.3) -> dict:
  """Every method's rounds on TINY (random weights, seed 0) or SmolLM2 (debate preset).

  Returns {"outputs": {method: [per-round {agent: ids}]}, "stats": {method: [...]}}.
  """
  import jax

  from tokendance_jax import model
  from tokendance_jax.config import TINY, CacheConfig
  from tokendance_jax.rounds import ReusePolicy
  from tokendance_jax.session import RoundSession

  if real:
    from tokendance_jax import api
    from tokendance_jax.roundrun import RoundRunConfig, run_rounds

    params, cfg, tok = api.load_model(progress=False)
  else:
    cfg = dataclasses.replace(TINY, eos_ids=())  # no early stop
    params = model.init_params(cfg, jax.random.PRNGKey(0))
  result = {"outputs": {}, "stats": {}}
  for method in methods:
    if real:
      rc = RoundRunConfig(method=method, preset="debate", agents=agents, rounds=rounds,
                          recompute=recompute, max_tokens=max_tokens, quality=False)
      rows = run_rounds(params, cfg, tok, rc, cache_cfg=CacheConfig(num_pages=256),
                        mesh=mesh)["rounds"]
    else:
      session = RoundSession(params, cfg, method=method, quality=False, mesh=mesh,
                             cache_cfg=CacheConfig(num_pages=160, page_size=8),
                             policy=ReusePolicy(recompute=recompute))
      rows = tiny_rounds(session, agents=agents, rounds=rounds, max_tokens=max_tokens)
      session.close()
    result["outputs"][method] = [r["outputs"] for r in rows]
    result["stats"][method] = [r["stats"] for r in rows]
  return result


def main(argv=None) -> int:
  args = parse_args(argv)
  jax = init_jax(args)
  from tokendance_jax import sharding

  mesh = sharding.make_mesh(args.mesh) if args.mesh else None
  result = {"processes": jax.process_count(), "devices": jax.device_count(),
            "mesh": sharding.describe(mesh) if mesh is not None else None}
  result |= run_methods(args.methods.split(","), mesh=mesh, real=args.real, agents=args.agents,
                        rounds=args.rounds, max_tokens=args.max_tokens,
                        recompute=args.recompute)
  if jax.process_index() == 0:
    text = json.dumps(result, indent=1)
    if args.json:
      pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
      pathlib.Path(args.json).write_text(text)
    else:
      print(text)
  if args.auto_cluster or args.num_processes > 1:
    jax.distributed.shutdown()
  return 0


if __name__ == "__main__":
  sys.exit(main())
