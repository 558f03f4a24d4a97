"""The `tokendance bench` configuration: the experiments, their defaults and --quick sizes, the
issue's targets, and `config_from_args` (the parsed flags -> `BenchConfig`, or a ValueError
naming the bad value, before any model loads)."""

from __future__ import annotations

import dataclasses
import math

from tokendance_jax.rounds import MASTERS, METHODS, REUSE_METHODS, ReusePolicy

EXPERIMENTS = ("storage", "prefill", "capacity", "sweep")
PRESETS = ("debate", "generative_agents", "agent_society")
ORDERS = ("canonical", "rotate_to_self", "random_per_agent")
MODEL = "SmolLM2-135M-Instruct"
# The paper's 1.5 s round SLO is for 7B/14B models on an A100; this is the
# same budget in this machine's terms: ~15k prompt tokens of full prefill at
# ~500 tokens/s on 2 CPU cores.
SLO_SECONDS = 30.0

# Issue 4's targets: name -> (target ratio, experiment, fewest agents the target is stated for).
TARGETS = {
    "shared_kv_vs_prefix": (12.0, "storage", 64),
    "whole_kv_vs_prefix": (4.5, "storage", 64),
    "prefill_vs_prefix": (1.5, "prefill", 16),
    "prefill_vs_cacheblend": (None, "prefill", 16),  # CPU: reported; the GPU target is 1.9x
    "agents_under_slo_vs_prefix": (3.0, "capacity", None),
    "top1_vs_full": (0.99, None, None),  # the quality bar (applied to the forced top-1)
}

DEFAULTS = {
    "storage": dict(preset="agent_society", agents="8,16,32,64", rounds=3,
                    methods="prefix,tokendance,full@8,cacheblend@8", max_tokens=16),
    "prefill": dict(preset="agent_society", agents="2,4,8,16", rounds=3,
                    methods="tokendance,cacheblend,epic", max_tokens=16),
    "capacity": dict(preset="agent_society", agents="1,64", rounds=3, methods="prefix,tokendance",
                     max_tokens=16, num_pages=384),
    "sweep": dict(preset="agent_society", agents="8", rounds=2, methods="tokendance",
                  max_tokens=16, fractions="0,0.05,0.1,0.15,0.3,0.5", selects="block,cacheblend"),
}
QUICK = {  # CI smoke sizes: under a minute each on 2 CPU cores (compilation dominates)
    "storage": dict(preset="debate", agents="2", rounds=2, methods="prefix,tokendance",
                    max_tokens=4),
    "prefill": dict(preset="debate", agents="2", rounds=2, methods="tokendance,cacheblend,epic",
                    max_tokens=4),
    "capacity": dict(preset="debate", agents="1,2", rounds=2, methods="prefix,tokendance",
                     max_tokens=4, num_pages=40),
    "sweep": dict(preset="debate", agents="2", rounds=2, methods="tokendance", max_tokens=4,
                  fractions="0,1", selects="block"),
}


@dataclasses.dataclass
class BenchConfig:
  experiment: str
  preset: str
  agents: list[int]
  rounds: int
  methods: list[tuple[str, int | None]]  # (method, largest agent count it runs at)
  select: str
  recompute: float
  check_layer: int
  masters: list[str]  # master policies; the first is the reuse methods' plain name
  tau: float | None
  max_tokens: int
  num_pages: int | None
  page_size: int
  slo_seconds: float
  order: str | None
  seed: int
  quality_agents: list[int]
  quick: bool
  fractions: list[float] = dataclasses.field(default_factory=list)  # sweep: recompute values
  taus: list[float] = dataclasses.field(default_factory=list)  # sweep: thresholds (cap: recompute)
  judge_agents: int | None = None  # quality on the first K agents only (None: every agent)
  selects: list[str] = dataclasses.field(default_factory=list)  # sweep: selections


def config_from_args(args) -> BenchConfig:
  """Defaults per experiment (and --quick) filled in; ValueError naming any bad value."""
  if args.experiment not in EXPERIMENTS:
    raise ValueError(f"unknown experiment {args.experiment!r}; expected one of "
                     f"{', '.join(EXPERIMENTS)}")
  d = (QUICK if args.quick else DEFAULTS)[args.experiment]
  pick = lambda name: d.get(name) if getattr(args, name) is None else getattr(args, name)  # noqa: E731
  preset = pick("preset")
  _choice("--preset", preset, PRESETS)
  agents = _int_list("--agents", pick("agents"))
  if args.experiment == "capacity" and len(agents) > 2:
    raise ValueError(f"--agents {pick('agents')!r}: capacity takes a search range LOW,HIGH")
  masters = _masters(args.masters)
  methods = _methods(pick("methods"), masters)
  _choice("--select", args.select, ("cacheblend", "block"))
  if args.order is not None:
    _choice("--order", args.order, ORDERS)
  if args.tau is not None and not 0 <= args.tau < math.inf:
    raise ValueError(f"--tau {args.tau!r} must be a finite number >= 0")
  if not 0.0 <= args.recompute <= 1.0:
    raise ValueError(f"--recompute {args.recompute!r} must be in [0, 1]")
  for name in ("rounds", "max_tokens", "num_pages", "page_size"):
    value = pick(name)
    if value is not None and value < 1:
      raise ValueError(f"--{name.replace('_', '-')} {value!r} must be >= 1")
  if args.check_layer < 0 or args.seed < 0:
    raise ValueError(f"--check-layer {args.check_layer!r} and --seed {args.seed!r} must be >= 0")
  if args.judge_agents is not None and args.judge_agents < 1:
    raise ValueError(f"--judge-agents {args.judge_agents!r} must be >= 1")
  if not args.slo_seconds > 0:
    raise ValueError(f"--slo-seconds {args.slo_seconds!r} must be > 0")
  fractions, selects, taus = [args.recompute], [args.select], []
  if args.experiment == "sweep":
    fractions = _float_list("--fractions", pick("fractions"))
    taus = _float_list("--taus", args.taus, upper=None) if args.taus else []
    if args.tau is not None:
      raise ValueError("--tau: the sweep takes its thresholds from --taus")
    selects = [x.strip() for x in str(pick("selects")).split(",")]
    for x in selects:
      _choice("--selects", x, ("cacheblend", "block"))
    if args.no_quality:
      raise ValueError("--no-quality: the sweep measures quality; it cannot skip it")
  if args.no_quality:
    quality = []
  elif args.quality_agents is not None:
    quality = _int_list("--quality-agents", args.quality_agents)
    missing = [n for n in quality if args.experiment != "capacity" and n not in agents]
    if missing:
      raise ValueError(f"--quality-agents {args.quality_agents!r}: {missing[0]} is not in --agents")
  else:
    quality = [min(agents)] if args.experiment != "capacity" else [max(min(agents), 2)]
  return BenchConfig(
      experiment=args.experiment, preset=preset, agents=agents, rounds=pick("rounds"),
      methods=methods, select=args.select, recompute=args.recompute,
      check_layer=args.check_layer, masters=masters, tau=args.tau,
      max_tokens=pick("max_tokens"), num_pages=pick("num_pages"),
      page_size=args.page_size, slo_seconds=args.slo_seconds, order=args.order, seed=args.seed,
      quality_agents=quality, quick=args.quick, fractions=fractions, selects=selects, taus=taus,
      judge_agents=args.judge_agents)


def _choice(flag: str, value, choices) -> None:
  if value not in choices:
    raise ValueError(f"{flag} {value!r} is not one of {', '.join(choices)}")


def _float_list(flag: str, text, upper: float | None = 1.0) -> list[float]:
  try:
    values = [float(x) for x in str(text).split(",")]
  except ValueError:
    raise ValueError(f"{flag} {text!r} must be comma-separated numbers") from None
  bad = [v for v in values if not (0.0 <= v < math.inf and (upper is None or v <= upper))]
  if bad:
    bounds = f"in [0, {upper:g}]" if upper is not None else "finite and >= 0"
    raise ValueError(f"{flag} {text!r}: values must be {bounds}, got {bad[0]}")
  return sorted(set(values))


def _int_list(flag: str, text) -> list[int]:
  try:
    values = [int(x) for x in str(text).split(",")]
  except ValueError:
    raise ValueError(f"{flag} {text!r} must be comma-separated integers") from None
  bad = [v for v in values if v < 1]
  if bad:
    raise ValueError(f"{flag} {text!r}: agent counts must be >= 1, got {bad[0]}")
  return sorted(set(values))


def _masters(text) -> list[str]:
  if text is None:
    return [ReusePolicy().masters]
  values = [x.strip() for x in str(text).split(",")]
  for x in values:
    _choice("--masters", x, MASTERS)
  if len(set(values)) != len(values):
    raise ValueError(f"--masters {text!r} names a policy twice")
  return values


def _methods(text: str, masters: list[str]) -> list[tuple[str, int | None]]:
  """(label, largest agent count) per run: reuse methods once per master policy, the first
  policy under the plain method name, the others as METHOD:MASTERS."""
  out = []
  for item in str(text).split(","):
    label, _, cap = item.strip().partition("@")
    name, _, explicit = label.partition(":")
    _choice("--methods", name, METHODS)
    cap = _int_list("--methods", cap)[0] if cap else None
    if explicit:
      _choice("--methods", explicit, MASTERS)
      if name not in REUSE_METHODS:
        raise ValueError(f"--methods {item!r}: {name} makes no masters")
      out.append((label if explicit != masters[0] else name, cap))
    elif name in REUSE_METHODS:
      out += [(name if i == 0 else f"{name}:{m}", cap) for i, m in enumerate(masters)]
    else:
      out.append((name, cap))
  if len({m for m, _ in out}) != len(out):
    raise ValueError(f"--methods {text!r} names a method twice")
  return out


def split_label(label: str, bc: BenchConfig) -> tuple[str, str]:
  """(method, master policy) of a run label such as "tokendance" or "tokendance:anchored"."""
  name, _, masters = label.partition(":")
  return name, masters or bc.masters[0]


def reuse_policy(bc: BenchConfig, label: str):
  """The ReusePolicy of the run `label` (METHOD or METHOD:MASTERS)."""
  method, masters = split_label(label, bc)
  epic = method == "epic"  # EPIC selects its own tokens: no threshold mode
  return ReusePolicy(select="epic" if epic else bc.select, recompute=bc.recompute,
                     check_layer=bc.check_layer, tau=None if epic else bc.tau, masters=masters)


def judged_agents(bc: BenchConfig, agents: int) -> set[str]:
  """The agents whose quality is measured: the first --judge-agents, or all."""
  k = agents if bc.judge_agents is None else min(bc.judge_agents, agents)
  return {f"agent{i}" for i in range(k)}
