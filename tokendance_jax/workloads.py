"""Seeded generators of multi-agent round prompts, at the text level.

A workload describes one synchronized multi-agent run (see WORKLOADS.md): in
round r every agent gets a prompt

    [system] [env:r] [persona_i] [memory_i + own history] [hdr + O_j ...] [tail_i]

and all agents of a round start together. `Workload.prompt(r, i)` returns that
prompt as a list of `TextSegment`s (text, marked shared or private) and
`OutputRef`s (agent j's generated output of round r', whose token ids only the
caller knows). The caller tokenizes the text; shared segments are byte-identical
in every prompt that holds them, so they can be found by content hash.

The text is plausible English composed from small banks of templates (a
Smallville-like town, an AgentSociety-like city with an economy and news, a
multi-agent math/fact debate), sized to token targets at ~4 characters per
token. Everything is seeded from (seed, stream, round, agent), so
`prompt(r, i)` does not depend on call order. The banks are JSON files in
`tokendance_jax/data/workload_*.json`; `workload_flavors` composes each
preset's pieces from them and `workload_text` holds the seeding, composition
and bank-loading helpers. This module is the public one: the config, presets,
prompt items and `Workload`.

`render(items, output, markers=True)` shows a prompt as text;
`private_share(items, output_chars)` measures how much of it is private.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np

from tokendance_jax.workload_flavors import FLAVOR_IMPLS, Agent, city_walk
from tokendance_jax.workload_text import (
  ENV,
  MEMORY,
  NAMES,
  OPENING,
  ORDER,
  OUT,
  PERSONA,
  SYSTEM,
  TAIL,
  TOPO,
  person_names,
  seeded_rng,
)

CHARS_PER_TOKEN = 4
TOPOLOGIES = ("all", "all_but_self", "k_random", "spatial_k")
ORDERS = ("canonical", "rotate_to_self", "random_per_agent")
CONTEXT_MODES = ("rerender", "accumulate")
FLAVORS = ("generative_agents", "agent_society", "debate")


@dataclasses.dataclass(frozen=True, kw_only=True)
class WorkloadConfig:
  """Shape of a multi-agent round workload; sizes are in tokens (~4 characters each).

  `preset` picks the text flavor (one of FLAVORS); the numbers are independent
  of it. Ranges are (low, high), inclusive, drawn uniformly per agent.
  """

  preset: str = "generative_agents"
  n_agents: int = 25
  rounds: int = 10
  sys_tokens: int = 400
  persona_tokens: tuple[int, int] = (100, 300)
  private_mem_tokens: tuple[int, int] = (200, 800)
  tail_tokens: int = 60
  out_tokens_median: int = 64
  out_tokens_clip: tuple[int, int] = (16, 256)
  topology: str = "all"
  k: int = 3
  order: str = "canonical"
  context_mode: str = "rerender"
  shared_env_tokens: int = 0
  seed: int = 0

  def __post_init__(self):
    for name in ("persona_tokens", "private_mem_tokens", "out_tokens_clip"):
      value = getattr(self, name)
      if isinstance(value, list):  # configs read from JSON; keep the dataclass hashable
        object.__setattr__(self, name, tuple(value))
    self.validate()

  def validate(self) -> None:
    """Raises ValueError naming the first bad field."""
    _check_choice("preset", self.preset, FLAVORS)
    _check_int("n_agents", self.n_agents, low=1)
    _check_int("rounds", self.rounds, low=1)
    _check_int("sys_tokens", self.sys_tokens, low=0)
    _check_range("persona_tokens", self.persona_tokens, low=0)
    _check_range("private_mem_tokens", self.private_mem_tokens, low=0)
    _check_int("tail_tokens", self.tail_tokens, low=0)
    _check_int("out_tokens_median", self.out_tokens_median, low=1)
    _check_range("out_tokens_clip", self.out_tokens_clip, low=1)
    _check_choice("topology", self.topology, TOPOLOGIES)
    _check_int("k", self.k, low=1)
    if self.topology in ("k_random", "spatial_k") and self.k > self.n_agents - 1:
      raise ValueError(
          f"k={self.k} exceeds the {self.n_agents - 1} other agents available to topology "
          f"{self.topology!r} (n_agents={self.n_agents})")
    _check_choice("order", self.order, ORDERS)
    _check_choice("context_mode", self.context_mode, CONTEXT_MODES)
    _check_int("shared_env_tokens", self.shared_env_tokens, low=0)
    _check_int("seed", self.seed, low=0)


def _check_int(name: str, value, *, low: int) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{name}={value!r} must be an int")
  if value < low:
    raise ValueError(f"{name}={value!r} must be >= {low}")


def _check_range(name: str, value, *, low: int) -> None:
  if not isinstance(value, tuple) or len(value) != 2:
    raise ValueError(f"{name}={value!r} must be a (low, high) pair")
  for v in value:
    _check_int(name, v, low=low)
  if value[0] > value[1]:
    raise ValueError(f"{name}={value!r} has low > high")


def _check_choice(name: str, value, choices: Sequence[str]) -> None:
  if value not in choices:
    raise ValueError(f"{name}={value!r} is not one of {', '.join(choices)}")


PRESETS: dict[str, WorkloadConfig] = {
    # Smallville: 25 residents, conversation-turn-sized outputs (cap 50 upstream).
    "generative_agents": WorkloadConfig(
        preset="generative_agents", n_agents=25, out_tokens_median=48),
    # AgentSociety: many citizens, a shared world state that changes every step,
    # small private profiles, short messages; the private share of a prompt is small.
    "agent_society": WorkloadConfig(
        preset="agent_society", n_agents=100, sys_tokens=500, shared_env_tokens=200,
        persona_tokens=(60, 120), private_mem_tokens=(80, 200), tail_tokens=40,
        out_tokens_median=32),
    # Du et al. multi-agent debate: everyone sees the others' earlier answers, accumulated.
    "debate": WorkloadConfig(
        preset="debate", n_agents=6, rounds=3, topology="all_but_self",
        context_mode="accumulate", sys_tokens=150, persona_tokens=(40, 80),
        private_mem_tokens=(0, 0), out_tokens_median=200, out_tokens_clip=(64, 400)),
}


def preset(name: str, **overrides) -> WorkloadConfig:
  """The named preset with `overrides` applied (e.g. `preset("debate", n_agents=3)`)."""
  if name not in PRESETS:
    raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
  fields = {f.name for f in dataclasses.fields(WorkloadConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"unknown WorkloadConfig field(s) {', '.join(unknown)} for preset {name!r}")
  return dataclasses.replace(PRESETS[name], **overrides)


@dataclasses.dataclass(frozen=True)
class TextSegment:
  """Literal prompt text; `shared` segments are byte-identical wherever they appear."""

  text: str
  shared: bool
  name: str  # "system", "env:r2", "opening", "persona:agent3", "header:agent5", ...


@dataclasses.dataclass(frozen=True)
class OutputRef:
  """Agent `agent`'s generated output of round `round`; the caller supplies the token ids.

  Shared when it sits among the other agents' outputs; `private=True` when it is
  the agent's own earlier output inside its private history.
  """

  agent: int
  round: int
  private: bool = False


PromptItem = TextSegment | OutputRef


def render(items: Sequence[PromptItem], output: Callable[[OutputRef], str] | None = None,
           markers: bool = False) -> str:
  """Joins a prompt into one string; `output(ref)` gives each output's text.

  With `markers`, every item is preceded by `<<name|shared>>` or `<<name|private>>`
  (for reading a prompt, not for feeding a model).
  """
  output = output or (lambda ref: f"[output of agent{ref.agent}, round {ref.round}]")
  parts = []
  for item in items:
    if isinstance(item, OutputRef):
      kind = "private" if item.private else "shared"
      name = f"output:agent{item.agent}:r{item.round}"
      text = output(item)
    else:
      kind = "shared" if item.shared else "private"
      name, text = item.name, item.text
    parts.append(f"<<{name}|{kind}>>{text}" if markers else text)
  return "".join(parts)


# --------------------------------------------------------------------------
# The workload.


class Workload:
  """Prompts of every agent in every round of one seeded multi-agent run."""

  def __init__(self, cfg: WorkloadConfig):
    if not isinstance(cfg, WorkloadConfig):
      raise ValueError(f"cfg={cfg!r} must be a WorkloadConfig")
    cfg.validate()
    self.cfg = cfg
    self._flavor = FLAVOR_IMPLS[cfg.preset]
    self.agents = [f"agent{i}" for i in range(cfg.n_agents)]
    self.names = person_names(cfg.seed, cfg.n_agents)
    self._people = [self._person(i) for i in range(cfg.n_agents)]
    self._everyone = Agent(index=-1, handle="all", name="", others=tuple(self.names))
    self.system_text = self._flavor.system(
        seeded_rng(cfg.seed, SYSTEM), self._everyone, _chars(cfg.sys_tokens))
    opening_tokens = min(max(cfg.out_tokens_median, 24), 160)
    self.opening_text = self._flavor.opening(
        seeded_rng(cfg.seed, OPENING), self._everyone, _chars(opening_tokens))
    self.persona_texts = [self._sized(PERSONA, i, cfg.persona_tokens, self._flavor.persona)
                          for i in range(cfg.n_agents)]
    self.memory_texts = [self._sized(MEMORY, i, cfg.private_mem_tokens, self._flavor.memory)
                         for i in range(cfg.n_agents)]
    self._env_cache: dict[int, str] = {}

  def _person(self, i: int) -> Agent:
    n = self.cfg.n_agents
    # A handful of acquaintances, so memories mention real other agents.
    rng = seeded_rng(self.cfg.seed, NAMES, 1, i)
    pool = [j for j in range(n) if j != i]
    picks = rng.permutation(pool)[:6] if pool else []
    return Agent(index=i, handle=self.agents[i], name=self.names[i],
                 others=tuple(self.names[int(j)] for j in picks))

  def _sized(self, stream: int, i: int, bounds: tuple[int, int], compose) -> str:
    rng = seeded_rng(self.cfg.seed, stream, i)
    tokens = int(rng.integers(bounds[0], bounds[1] + 1))
    return compose(rng, self._people[i], _chars(tokens)) if tokens > 0 else ""

  # ---- Sizes and visibility.

  def _check(self, round: int, agent: int) -> None:
    if isinstance(round, bool) or not isinstance(round, (int, np.integer)) or not (
        0 <= round < self.cfg.rounds):
      raise ValueError(f"round={round!r} is outside 0..{self.cfg.rounds - 1}")
    if isinstance(agent, bool) or not isinstance(agent, (int, np.integer)) or not (
        0 <= agent < self.cfg.n_agents):
      raise ValueError(f"agent={agent!r} is outside 0..{self.cfg.n_agents - 1}")

  def max_tokens(self, round: int, agent: int) -> int:
    """Output cap of `agent` in `round`: lognormal(median, sigma 0.5), clipped."""
    self._check(round, agent)
    z = seeded_rng(self.cfg.seed, OUT, round, agent).standard_normal()
    low, high = self.cfg.out_tokens_clip
    return int(min(high, max(low, _round_half(self.cfg.out_tokens_median * math.exp(0.5 * z)))))

  def visible(self, src_round: int, agent: int) -> list[int]:
    """The agents whose round-`src_round` outputs `agent` sees, in prompt order.

    Chosen once per (src_round, agent), so in accumulate mode a block keeps its
    place in every later prompt of that agent.
    """
    self._check(src_round, agent)
    cfg, n, i = self.cfg, self.cfg.n_agents, agent
    if cfg.topology == "all":
      chosen = list(range(n))
    elif cfg.topology == "all_but_self":
      chosen = [j for j in range(n) if j != i]
    elif cfg.topology == "k_random":
      rng = seeded_rng(cfg.seed, TOPO, src_round, i)
      chosen = [int(j) for j in rng.choice([j for j in range(n) if j != i], cfg.k, replace=False)]
    else:  # spatial_k: the k nearest on a ring, alternating sides
      chosen = []
      for d in range(1, n):
        for j in ((i + d) % n, (i - d) % n):
          if j != i and j not in chosen and len(chosen) < cfg.k:
            chosen.append(j)
    return self._ordered(chosen, src_round, i)

  def _ordered(self, chosen: list[int], src_round: int, i: int) -> list[int]:
    n = self.cfg.n_agents
    if self.cfg.order == "canonical":
      return sorted(chosen)
    if self.cfg.order == "rotate_to_self":
      return sorted(chosen, key=lambda j: (j - i - 1) % n)
    rng = seeded_rng(self.cfg.seed, ORDER, src_round, i)
    chosen = sorted(chosen)
    return [chosen[int(p)] for p in rng.permutation(len(chosen))]

  # ---- Text pieces.

  def env_text(self, round: int) -> str:
    """The shared world state of `round` ("" when shared_env_tokens is 0)."""
    if self.cfg.shared_env_tokens == 0:
      return ""
    if round not in self._env_cache:
      walk = city_walk(self.cfg.seed, round)
      self._env_cache[round] = self._flavor.env(
          seeded_rng(self.cfg.seed, ENV, round), round, walk, self._everyone,
          _chars(self.cfg.shared_env_tokens))
    return self._env_cache[round]

  def tail_text(self, round: int, agent: int) -> str:
    """Agent `agent`'s private closing question in `round`, ending in its handle and ":"."""
    self._check(round, agent)
    rng = seeded_rng(self.cfg.seed, TAIL, round, agent)
    return self._flavor.tail(rng, round, self._people[agent], _chars(self.cfg.tail_tokens))

  def header_text(self, agent: int, src_round: int) -> str:
    """The shared header before agent `agent`'s output of `src_round`."""
    who = f"Agent {agent} ({self.names[agent]})" if self._flavor.named_headers else f"Agent {agent}"
    if self.cfg.context_mode == "accumulate":
      return f"\n{who} said (round {src_round}):\n"
    return f"\n{who} said:\n"

  # ---- Prompts.

  def prompt(self, round: int, agent: int) -> list[PromptItem]:
    """Agent `agent`'s prompt in `round`: shared/private text and output references."""
    self._check(round, agent)
    handle = self.agents[agent]
    items: list[PromptItem] = []

    def text(value: str, shared: bool, name: str) -> None:
      if value:
        items.append(TextSegment(value, shared, name))

    text(self.system_text, True, "system")
    text(self.env_text(round), True, f"env:r{round}")
    text(self.persona_texts[agent], False, f"persona:{handle}")
    text(self.memory_texts[agent], False, f"memory:{handle}")
    for past in range(round):  # history growth: own earlier outputs, private
      text(self._flavor.history_header(past), False, f"history:{handle}:r{past}")
      items.append(OutputRef(agent, past, private=True))
    if round == 0:
      text(self.opening_text, True, "opening")
    first = 0 if self.cfg.context_mode == "accumulate" else round - 1
    for src in range(max(first, 0), round):
      for j in self.visible(src, agent):
        name = f"header:agent{j}" + (f":r{src}" if self.cfg.context_mode == "accumulate" else "")
        text(self.header_text(j, src), True, name)
        items.append(OutputRef(j, src))
    text(self.tail_text(round, agent), False, f"tail:{handle}")
    return items

  def round_prompts(self, round: int) -> list[list[PromptItem]]:
    """Every agent's prompt in `round`, by agent index."""
    return [self.prompt(round, i) for i in range(self.cfg.n_agents)]


def _chars(tokens: int) -> int:
  return CHARS_PER_TOKEN * tokens


def _round_half(x: float) -> int:
  """Round half up (Python's round() rounds half to even)."""
  return int(math.floor(x + 0.5))


def private_share(items: Sequence[PromptItem], output_chars: int) -> float:
  """Characters of private items / all characters, each OutputRef counted as `output_chars`."""
  private = total = 0
  for item in items:
    if isinstance(item, OutputRef):
      size, is_private = output_chars, item.private
    else:
      size, is_private = len(item.text), not item.shared
    total += size
    private += size if is_private else 0
  return private / total if total else 0.0
