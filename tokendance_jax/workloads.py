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
`prompt(r, i)` does not depend on call order.

`render(items, output, markers=True)` shows a prompt as text;
`private_share(items, output_chars)` measures how much of it is private.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np

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
# Seeding and text composition.

_SYSTEM, _PERSONA, _MEMORY, _ENV, _OPENING, _TAIL, _OUT, _TOPO, _ORDER, _NAMES, _WALK = range(11)


def _rng(seed: int, stream: int, *keys: int) -> np.random.Generator:
  return np.random.default_rng([seed, stream, *keys])


def _pick(rng: np.random.Generator, seq: Sequence):
  return seq[int(rng.integers(len(seq)))]


class _Slots(dict):
  """A format_map mapping that draws each `{slot}` from its bank on first use.

  Banks are sequences or callables `f(rng) -> str`. A slot named like another
  plus a digit ("other2") draws from the same bank ("other"), avoiding values
  already drawn for it, so "{other} and {other2}" names two different people.
  """

  def __init__(self, rng: np.random.Generator, banks: dict):
    super().__init__()
    self.rng, self.banks = rng, banks

  def __missing__(self, key: str) -> str:
    base = key.rstrip("0123456789")
    bank = self.banks[base]
    if callable(bank):
      value = bank(self.rng)
    else:
      taken = {v for k, v in self.items() if k.rstrip("0123456789") == base}
      fresh = [v for v in bank if v not in taken] or list(bank)
      value = _pick(self.rng, fresh)
    self[key] = value
    return value


def _format(rng: np.random.Generator, template: str, banks: dict) -> str:
  return template.format_map(_Slots(rng, banks))


def _fill(rng: np.random.Generator, make: Callable[[np.random.Generator, int], str],
          target: int, sep: str = " ") -> str:
  """Joins parts `make(rng, k)` (k = parts so far) until the length is nearest `target`.

  Parts are added while they fit; the first that overshoots is swapped for the
  closest of a few alternatives, and kept only if it brings the length nearer.
  Exact repeats are skipped where a fresh part can be found.
  """
  parts: list[str] = []
  seen: set[str] = set()
  n = 0
  while n < target and len(parts) < 10_000:
    extra = len(sep) if parts else 0
    part = make(rng, len(parts))
    for _ in range(8):
      if part not in seen:
        break
      part = make(rng, len(parts))
    if n + extra + len(part) > target:
      options = [part] + [make(rng, len(parts)) for _ in range(4)]
      options = [p for p in options if p not in seen] or options
      part = min(options, key=lambda p: abs(n + extra + len(p) - target))
      if abs(n + extra + len(part) - target) >= target - n:
        break
    parts.append(part)
    seen.add(part)
    n += extra + len(part)
  return sep.join(parts)


def _from_list(items: Sequence[str], then: Callable[[np.random.Generator], str]):
  """A `make` for `_fill`: the items in order, then `then(rng)` parts."""
  def make(rng, k):
    return items[k] if k < len(items) else then(rng)
  return make


def _shuffled(rng: np.random.Generator, items: Sequence[str]) -> list[str]:
  return [items[i] for i in rng.permutation(len(items))]


def _capitalize(text: str) -> str:
  return text[:1].upper() + text[1:]


def _clock(hour: int) -> str:
  h = hour % 12 or 12
  return f"{h}:00 {'AM' if hour % 24 < 12 else 'PM'}"


def _money(low: float, high: float) -> Callable[[np.random.Generator], str]:
  return lambda rng: f"${rng.uniform(low, high):,.0f}"


def _int_between(low: int, high: int) -> Callable[[np.random.Generator], str]:
  return lambda rng: str(int(rng.integers(low, high + 1)))


# --------------------------------------------------------------------------
# Names, shared by all flavors.

_FIRST = (
    "Isabella", "Klaus", "Maria", "Ayesha", "Wolfgang", "Mei", "John", "Eddy", "Jane", "Tom",
    "Carmen", "Tamara", "Arthur", "Yuriko", "Carlos", "Hailey", "Sam", "Jennifer", "Francisco",
    "Latoya", "Rajiv", "Abigail", "Giorgio", "Ryan", "Adam", "Jen", "Hans", "Priya", "Omar",
    "Lucia", "Daniel", "Grace", "Mateo", "Nadia", "Victor", "Elena", "Kenji", "Fatima", "Oliver",
    "Chloe", "Samuel", "Ingrid", "Diego", "Amara", "Felix", "Rosa", "Leo", "Hannah")
_LAST = (
    "Rodriguez", "Mueller", "Lopez", "Khan", "Schulz", "Lin", "Moreno", "Taylor", "Moore", "Kim",
    "Ortiz", "Bennett", "Burton", "Yamamoto", "Gomez", "Johnson", "Williams", "Smith", "Harris",
    "Patel", "Rossi", "Park", "Brown", "Nguyen", "Silva", "Novak", "Okafor", "Fischer", "Dubois",
    "Larsen", "Ivanova", "Costa", "Murphy", "Chen", "Haddad", "Kowalski", "Sato", "Mendes",
    "Reyes", "Walker", "Adeyemi", "Berg", "Castillo", "Hughes", "Fernandes", "Weber", "Russo",
    "Olsen")


def _person_names(seed: int, n: int) -> list[str]:
  """n distinct full names; agent i's name depends on the seed only, not on n."""
  combos = len(_FIRST) * len(_LAST)
  perm = _rng(seed, _NAMES).permutation(combos)
  names = []
  for i in range(n):
    c = int(perm[i % combos])
    first, last = _FIRST[c // len(_LAST)], _LAST[c % len(_LAST)]
    middle = "" if i < combos else f" {chr(ord('A') + (i // combos - 1) % 26)}."
    names.append(f"{first}{middle} {last}")
  return names


# --------------------------------------------------------------------------
# Flavors: the text banks. Each builds the pieces of a prompt to a character target.


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Agent:
  index: int
  handle: str  # "agent3"
  name: str  # "Isabella Rodriguez"
  others: tuple[str, ...]  # other agents' names, for memories and relationships


class _Flavor:
  """Base: subclasses provide the banks and the per-piece composers."""

  named_headers = True  # "Agent 5 (Leo Haddad) said:" rather than "Agent 5 said:"

  # `everyone` is a pseudo-agent whose `others` are all the agents' names, for shared text.
  def system(self, rng, everyone: _Agent, target: int) -> str:
    raise NotImplementedError

  def persona(self, rng, agent: _Agent, target: int) -> str:
    raise NotImplementedError

  def memory(self, rng, agent: _Agent, target: int) -> str:
    raise NotImplementedError

  def env(self, rng, round: int, walk: dict, everyone: _Agent, target: int) -> str:
    raise NotImplementedError

  def opening(self, rng, everyone: _Agent, target: int) -> str:
    raise NotImplementedError

  def tail(self, rng, round: int, agent: _Agent, target: int) -> str:
    raise NotImplementedError

  def history_header(self, round: int) -> str:
    return f"\nWhat I said in round {round}:\n"


def _compose(rng, head: str, make, target: int, tail: str = "", sep: str = " ") -> str:
  """`head`, then parts from `make` up to `target` characters in all, then `tail`."""
  body = _fill(rng, make, max(0, target - len(head) - len(tail) - len(sep)), sep=sep)
  joined = head + (sep + body if body and head else body)
  return joined + tail


# ---- Generative Agents: Smallville.

_TOWN_PLACES = {
    "Hobbs Cafe": "a cozy cafe on Main Street that serves coffee, pastries and light lunches, "
                  "open from 8 AM to 8 PM",
    "The Rose and Crown Pub": "a pub with a small stage where locals gather in the evenings for "
                              "drinks, darts and live music",
    "Oak Hill College": "the town's college, with lecture halls, a library, a music department "
                        "and a dormitory for students",
    "The Willows Market and Pharmacy": "the grocery store and pharmacy where most residents do "
                                       "their weekly shopping",
    "Harvey Oak Supply Store": "a hardware and art supply store that also sells garden tools "
                               "and paint",
    "Johnson Park": "a park with a pond, a fountain, walking paths and benches under old oak "
                    "trees",
    "the Smallville Public Library": "a quiet two-story library with a reading room, a poetry "
                                     "shelf and public computers",
    "the town hall": "the building where the mayor works and where town meetings are held on "
                     "Thursday evenings",
    "the Smallville Bakery": "a family bakery that opens at six in the morning and is known for "
                             "its cinnamon rolls",
    "the community garden on Elm Street": "a garden with vegetable beds, a tool shed and a "
                                          "bench, looked after by volunteers",
    "the Moreno family house": "a two-story house with a large kitchen where the family eats "
                               "dinner together",
    "the artist's co-living space": "a shared house where several young artists live and work "
                                    "in a common studio",
}
_TOWN_JOBS = (
    "the owner of Hobbs Cafe", "a shopkeeper at The Willows Market and Pharmacy",
    "a student at Oak Hill College studying music composition",
    "a painter who rents a studio in the artist's co-living space",
    "a bartender at The Rose and Crown Pub", "a professor of philosophy at Oak Hill College",
    "a retired mathematician", "a clerk at Harvey Oak Supply Store",
    "a librarian at the Smallville Public Library", "a baker at the Smallville Bakery",
    "a nurse at the Smallville clinic", "a gardener who looks after Johnson Park",
    "a journalist who writes for the Smallville Gazette", "a poet working on a first collection",
    "a carpenter with a workshop on Elm Street", "a teacher at Smallville Elementary",
    "a college student studying economics at Oak Hill College",
    "a software engineer who works from home", "a pianist who plays at the pub on weekends",
    "a dentist with a practice on Main Street")
_TRAITS = (
    "friendly", "outgoing", "hospitable", "curious", "patient", "stubborn", "kind", "ambitious",
    "shy", "witty", "thoughtful", "organized", "absent-minded", "generous", "cautious",
    "energetic", "sarcastic", "warm", "analytical", "dreamy", "hardworking", "talkative",
    "reserved", "competitive")


def _traits(rng, n: int) -> str:
  return ", ".join(_TRAITS[int(i)] for i in rng.choice(len(_TRAITS), n, replace=False))


_INTERESTS = (
    "planning community events", "writing poetry", "gardening", "local politics", "jazz piano",
    "chess", "birdwatching", "baking sourdough bread", "the history of Smallville",
    "running along the river", "painting landscapes", "reading mystery novels",
    "cooking spicy food", "restoring old furniture", "photography", "learning Japanese")
_TOWN_BANKS = {
    "place": tuple(_TOWN_PLACES),
    "activity": (
        "reading a novel", "sketching the fountain", "arguing with the cashier",
        "practicing the piano", "jogging past the pond", "buying coffee beans",
        "chatting with a stranger", "writing in a notebook", "fixing a bicycle",
        "carrying groceries home", "handing out flyers", "looking for a lost cat",
        "eating lunch alone", "playing chess with a student"),
    "when": (
        "yesterday morning", "last Tuesday", "two days ago", "this morning",
        "on Sunday afternoon", "late last night", "at lunch yesterday", "a week ago",
        "on Friday evening"),
    "feeling": (
        "happy", "a little embarrassed", "worried", "proud", "annoyed", "grateful", "curious",
        "relieved", "lonely", "excited"),
    "event_other": (
        "forgot my name", "complimented my work", "shared their lunch with me",
        "cancelled our plans at the last minute", "invited me to dinner",
        "beat me at chess", "helped me carry boxes", "asked for my advice",
        "did not say hello"),
    "favor": (
        "help decorate the cafe", "return the borrowed ladder", "read a draft of their essay",
        "bring some fresh bread", "water their plants", "practice a duet",
        "proofread a flyer", "lend them a bicycle"),
    "deadline": ("the weekend", "Friday", "the party", "the end of the month", "tomorrow"),
    "topic": (
        "the mayoral election", "the new bike lane", "rising rent", "the college budget",
        "a recent art exhibition", "whether the park needs more benches",
        "the best pastry in town", "the noise from the pub"),
    "gossip": (
        "Hobbs Cafe is hosting a Valentine's Day party on February 14 from 5 PM to 7 PM",
        "the pharmacy is running low on cold medicine",
        "a new family moved into the house on Elm Street",
        "the library will stay open later on weekdays",
        "the college is looking for volunteers for the spring fair",
        "the town election is coming up next month",
        "the supply store is closing early this week for inventory"),
    "self_activity": (
        "spent an hour painting", "closed the shop early", "cooked a big pot of soup",
        "walked along the river", "stayed late at work", "fell asleep reading",
        "had breakfast alone", "called my sister", "tidied the kitchen"),
    "observation": (
        "the cafe was unusually crowded", "the streetlights on Main Street were broken",
        "the supply store had a new window display", "the pub was quiet for a Friday",
        "the library had moved the poetry shelf", "someone left flowers on the park bench",
        "the bakery had run out of cinnamon rolls by nine"),
    "weather": (
        "cold and clear", "grey with light rain", "sunny and mild", "windy, with low clouds",
        "foggy until mid-morning", "crisp, with frost on the lawns"),
    "state": (
        "feeling a bit tired", "in a cheerful mood", "thinking about the party",
        "worried about money", "hungry", "looking forward to the evening",
        "distracted by a conversation from earlier"),
    "trait": _TRAITS,
    "interest": _INTERESTS,
}
_TOWN_RULES = (
    "Each round of the simulation covers one hour of the day; at the end of every round, each "
    "resident's reply is shared with the residents who can see or hear them.",
    "Stay in character at all times: speak and act as the person described in your identity "
    "summary, and treat your own memories as the basis of what you know.",
    "Do not invent events that contradict your memories or what other residents have said.",
    "Keep your answers short and concrete: say where you are, what you are doing and who you "
    "are talking to.",
    "You may start a conversation with any resident you can see, and you may decline to talk "
    "if your plans do not allow it.",
    "Residents eat, work, sleep and socialize on a daily schedule and move between places such "
    "as Hobbs Cafe, The Rose and Crown Pub, Oak Hill College and Johnson Park.",
    "Information spreads through conversation: if someone tells you about an event, you may "
    "pass it on to others, but say who told you.",
    "When you plan, think about your long-term goals as well as the next hour.",
    "You cannot read other residents' minds; you only know what they said aloud or what you "
    "saw yourself.",
    "If a resident invites you to an event, decide based on your schedule and your relationship "
    "with them, and say so.",
    "Do not mention that you are part of a simulation or that you are a language model.",
    "Answer in plain prose in the first person; do not use lists or headings.",
    "Be polite to other residents, but you are allowed to disagree, to be busy, or to be in a "
    "bad mood.",
    "Shops close in the evening, and most residents are asleep between midnight and six in the "
    "morning.",
    "The simulation starts on the morning of February 13, the day before Valentine's Day.",
    "Relationships change slowly: a single pleasant conversation does not make two strangers "
    "close friends.",
)
_TOWN_MEMORIES = (
    "I remember {other} telling me at {place} that {gossip}.",
    "I remember seeing {other} {activity} at {place} {when}.",
    "I remember feeling {feeling} when {other} {event_other}.",
    "I remember that {other} asked me to {favor} before {deadline}.",
    "I remember {other} and {other2} arguing about {topic} at {place} {when}.",
    "I remember I promised {other} to {favor} before {deadline}.",
    "I remember that {when} I {self_activity} and then went to {place}.",
    "I remember noticing {when} that {observation}.",
    "I remember talking with {other} about {topic}; we did not agree.",
    "I remember that {other} is {trait} and cares a lot about {interest}.",
)
_TOWN_EVENTS = (
    "Word is going around that {gossip}.",
    "{other} is asking whether anyone can {favor}.",
    "{other} has been seen {activity} at {place}.",
    "People at {place} are talking about {topic}.",
    "Several residents noticed that {observation}.",
)


def _town_event(rng, banks: dict) -> str:
  return _capitalize(_format(rng, _pick(rng, _TOWN_EVENTS), banks))


class _Town(_Flavor):
  """Generative Agents (Smallville): identity summaries, retrieved memories, hourly rounds."""

  def _banks(self, agent: _Agent) -> dict:
    others = agent.others or ("a neighbor", "a stranger")
    return {**_TOWN_BANKS, "other": others}

  def system(self, rng, everyone, target):
    n_agents = len(everyone.others)
    head = (f"This is a simulation of Smallville, a small town with {n_agents} residents. You "
            "play one of the residents, and the others are played by other instances of you.")
    tail = (" Below are your identity summary, your relevant memories, and what the residents "
            "near you said during the last hour.\n")
    places = [f"{p}: {d}." for p, d in _TOWN_PLACES.items()]
    parts = _shuffled(rng, _TOWN_RULES) + ["About the town."] + _shuffled(rng, places)
    banks = self._banks(everyone)
    return _compose(rng, head, _from_list(parts, lambda r: _town_event(r, banks)), target, tail)

  def persona(self, rng, agent, target):
    first = agent.name.split()[0]
    traits = _traits(rng, 3)
    head = (f"Name: {agent.name} ({agent.handle})\nAge: {int(rng.integers(19, 74))}\n"
            f"Innate traits: {traits}\nLearned traits: {first} is {_pick(rng, _TOWN_JOBS)}.")
    banks = self._banks(agent)
    lines = [
        f"Currently: {first} is " + _format(rng, _pick(rng, (
            "planning a small event at {place} and inviting the people {first} knows.",
            "trying to spend more time on {interest} this month.",
            "preparing for a busy week and worried about {topic}.",
            "saving money and thinking about {topic}.")), {**banks, "first": (first,)}),
        f"Lifestyle: {first} goes to bed around {int(rng.integers(9, 12))} PM, wakes up around "
        f"{int(rng.integers(5, 9))} AM, and eats dinner around {int(rng.integers(5, 8))} PM.",
    ]
    more = (
        "{first} knows {other} from {place} and thinks they are {trait}.",
        "{first} cares a lot about {interest}.",
        "{first} is {trait} with strangers but {trait2} with close friends.",
        "{first} often spends free time at {place}.",
        "{first} has strong opinions about {topic}.",
        "{first} and {other} meet most weeks at {place}.",
    )
    more_banks = {**banks, "first": (first,)}
    make = _from_list(lines, lambda r: _format(r, _pick(r, more), more_banks))
    return _compose(rng, head, make, target - 1, sep="\n") + "\n"

  def memory(self, rng, agent, target):
    head = f"Relevant memories of {agent.name}:"
    banks = self._banks(agent)
    make = lambda r, k: "- " + _format(r, _pick(r, _TOWN_MEMORIES), banks)
    return _compose(rng, head, make, target - 1, sep="\n") + "\n"

  def env(self, rng, round, walk, everyone, target):
    hour = 7 + round
    weather = _pick(rng, _TOWN_BANKS["weather"])
    head = f"Smallville update, {_clock(hour)}: the weather is {weather}."
    banks = self._banks(everyone)
    make = lambda r, k: _town_event(r, banks)
    return _compose(rng, head, make, target - 1) + "\n"

  def opening(self, rng, everyone, target):
    weather = _pick(rng, _TOWN_BANKS["weather"])
    head = (f"It is 7:00 AM on February 13 in Smallville, and the town is waking up; the weather "
            f"is {weather}. Nobody has spoken yet today.")
    banks = self._banks(everyone)
    make = lambda r, k: _town_event(r, banks)
    return _compose(rng, head, make, target - 1) + "\n"

  def tail(self, rng, round, agent, target):
    first = agent.name.split()[0]
    hour = 8 + round
    day = 13 + hour // 24
    suffix = f"What do you do next? Answer in two sentences.\n{agent.handle}:"
    head = f"It is {_clock(hour)} on February {day}."
    here, there = (tuple(_TOWN_PLACES)[int(j)] for j in rng.choice(len(_TOWN_PLACES), 2, False))
    make = _from_list(
        [f"{first} is at {here}.", f"{first} is {_pick(rng, _TOWN_BANKS['state'])}.",
         f"{first} could go to {there} next or stay put."],
        lambda r: f"{first} has no fixed plans for the next hour.")
    return "\n" + _compose(rng, head, make, target - 2 - len(suffix)) + "\n" + suffix


# ---- AgentSociety: a city with an economy, news and social networks.

_DISTRICTS = {
    "Riverside": "a quiet residential district along the river with affordable rents and a "
                 "large weekend market",
    "Old Town": "the historic center, full of small shops, cafes, museums and tourists",
    "the Financial District": "office towers, banks and expensive apartments; most white-collar "
                              "jobs are here",
    "Eastgate": "an industrial district with warehouses, factories and the main bus depot",
    "Northfield": "a suburb of family houses, schools and parks, an hour from the center by bus",
    "the University Quarter": "the university campus, student housing, bookshops and cheap "
                              "restaurants",
}
_CITY_JOBS = (
    "bus driver", "nurse", "software developer", "factory worker", "shop assistant",
    "primary school teacher", "accountant", "delivery rider", "university student",
    "restaurant cook", "electrician", "bank clerk", "retired civil servant", "freelance designer",
    "warehouse manager", "pharmacist", "construction worker", "journalist")
_CITY_BANKS = {
    "district": tuple(_DISTRICTS),
    "amount": _money(8, 240),
    "pct": _int_between(2, 15),
    "when": (
        "Last Monday", "Last Tuesday", "Last weekend", "A week ago", "Two weeks ago",
        "Last month", "Ten days ago", "On Friday"),
    "feeling": ("relieved", "anxious", "cheerful", "frustrated", "hopeful", "tired", "lonely"),
    "topic": (
        "the rent increase", "the basic income trial", "the new subway line", "job openings",
        "food prices", "the heat wave", "the mayor's speech", "weekend plans",
        "the football match"),
    "purpose": (
        "visit my parents", "look for a cheaper apartment", "attend a job interview",
        "buy a birthday present", "see a doctor", "meet friends for dinner",
        "join a protest about rents"),
    "event_other": (
        "lent me money", "recommended me for a job", "forgot my birthday", "invited me to a party",
        "complained about the neighbors", "helped me move furniture", "shared some bad news"),
    "headline": (
        "the city council approved a basic income trial for 5,000 households",
        "a new subway line between Riverside and the Financial District opens next month",
        "a heat wave is expected to last until the weekend",
        "the largest factory in Eastgate announced 300 layoffs",
        "food prices rose for the third month in a row",
        "the central bank raised interest rates by a quarter point",
        "a new hospital wing opened in Northfield",
        "rents in Old Town reached a record high",
        "the university will cut tuition fees for local students",
        "a water main broke in Eastgate and several streets are closed",
        "the city will plant 10,000 trees along major roads",
        "tech companies in the Financial District are hiring again"),
    "info": (
        "public transport is free on Sunday", "the weekend market in Riverside is open as usual",
        "a music festival takes place in Old Town on Saturday",
        "the tax office extended the filing deadline by two weeks",
        "several supermarkets are offering discounts on vegetables",
        "a blood donation drive is running at the university",
        "job fairs are held in Eastgate every Wednesday"),
    "values": (
        "family comes first", "hard work pays off", "fairness and equal opportunity",
        "personal freedom", "helping neighbors", "financial security", "honesty"),
    "hobby": (
        "cooking", "cycling", "reading the news", "playing football", "gardening",
        "video games", "volunteering", "watching films", "fishing"),
    "trait": _TRAITS,
    "family": (
        "single", "married", "married, two children", "divorced, one child",
        "lives with parents", "widowed"),
    "education": (
        "high school", "vocational training", "bachelor degree", "master degree", "doctorate"),
}
_CITY_RULES = (
    "Your decisions should follow from your profile, your current needs (satiety, energy, "
    "safety and social contact) and the current state of the city.",
    "You can work, shop, rest, move between districts, and send short messages to people in "
    "your social network.",
    "Messages must be shorter than 100 characters, and plans should fit on one line.",
    "Prices, wages and the unemployment rate change from day to day; consider them when you "
    "decide whether to spend or to save.",
    "You receive a monthly income from your job, if you have one, and you pay rent and taxes at "
    "the end of each month.",
    "When the news reports an event, you may react to it, discuss it with friends, or ignore it.",
    "Your mood and opinions can change based on what your friends say, but you should not "
    "abandon your core values.",
    "Do not describe the simulation itself, and do not speak for other citizens.",
    "Travel takes time and money: you can walk, cycle, take the bus or the subway, or drive.",
    "If you are hungry or exhausted, meeting those needs usually comes first.",
    "Your savings cannot go below zero; if you cannot afford something, choose a cheaper option.",
    "Keeping in touch with friends raises your social satisfaction, while arguments lower it.",
    "Everything you say is shared with the citizens in your network at the start of the next "
    "step.",
    "Consider both short-term needs and long-term goals, such as a better job, more education, "
    "or saving for a home.",
    "The city government may announce new policies, such as a basic income trial or a change "
    "in the tax rate, and citizens are surveyed about them every week.",
    "Answer as the citizen, in the first person, without explaining your reasoning at length.",
)
_CITY_INCIDENTS = (
    "{when}, I bought groceries at the market in {district} and spent {amount}.",
    "{when}, I had a long call with {other} about {topic}.",
    "{when}, I worked an extra shift and earned {amount} more than usual.",
    "{when}, I read that {headline}.",
    "{when}, I felt {feeling} after {other} {event_other}.",
    "{when}, I took the subway to {district} to {purpose}.",
    "{when}, my landlord told me the rent will go up by {pct}% next month.",
    "{when}, I argued with {other} about {topic}.",
    "{when}, I paid {amount} for electricity and internet.",
    "{when}, {other} told me that {info}.",
)


class _City(_Flavor):
  """AgentSociety: shared world state, private profile and status, short messages."""

  def _banks(self, agent: _Agent) -> dict:
    others = agent.others or ("a neighbor", "a colleague")
    return {**_CITY_BANKS, "other": others}

  def system(self, rng, everyone, target):
    n_agents = len(everyone.others)
    head = (f"You are a citizen of a simulated city with {n_agents} residents, part of a "
            "large-scale social simulation. Every step is one simulated day: all citizens act at "
            "the same time, and the city updates its economy and news after each step.")
    tail = (" The current world state, your profile and status, your recent incidents, and the "
            "latest messages from other citizens follow.\n")
    districts = [f"{d}: {t}." for d, t in _DISTRICTS.items()]
    parts = _shuffled(rng, _CITY_RULES) + ["The districts of the city."] + districts
    banks = self._banks(everyone)
    more = lambda r: "Recent news: " + _capitalize(_format(r, "{headline}.", banks))
    return _compose(rng, head, _from_list(parts, more), target, tail)

  def persona(self, rng, agent, target):
    first = agent.name.split()[0]
    job = _pick(rng, _CITY_JOBS)
    home = _pick(rng, tuple(_DISTRICTS))
    age = int(rng.integers(18, 80))
    head = f"Profile: {agent.name} ({agent.handle}), {age}, {job}, lives in {home}."
    facts = _shuffled(rng, [
        f"Monthly income: ${int(rng.integers(9, 70)) * 100:,}.",
        f"Savings: ${int(rng.integers(0, 400)) * 100:,}.",
        f"Family: {_pick(rng, _CITY_BANKS['family'])}.",
        f"Education: {_pick(rng, _CITY_BANKS['education'])}.",
        f"Personality: {_traits(rng, 2)}.",
        f"Values: {_pick(rng, _CITY_BANKS['values'])}.",
        f"Hobby: {_pick(rng, _CITY_BANKS['hobby'])}.",
    ])
    status = (f"Status: satiety {rng.uniform(0.2, 1):.1f}, energy {rng.uniform(0.2, 1):.1f}, "
              f"mood {_pick(rng, _CITY_BANKS['feeling'])}.")
    banks = self._banks(agent)
    make = _from_list([status] + facts, lambda r: _format(
        r, f"{first} is friends with {{other}} and often talks about {{topic}}.", banks))
    return _compose(rng, head, make, target - 1) + "\n"

  def memory(self, rng, agent, target):
    banks = self._banks(agent)
    make = lambda r, k: "- " + _format(r, _pick(r, _CITY_INCIDENTS), banks)
    return _compose(rng, "Recent incidents:", make, target - 1, sep="\n") + "\n"

  def env(self, rng, round, walk, everyone, target):
    items = [
        f"World state, day {round + 1}.",
        f"Weather: {walk['weather']}, high of {walk['temp']:.0f} C.",
        f"Prices: rice ${walk['rice']:.2f} per kg, bread ${walk['bread']:.2f}, bus ticket "
        f"${walk['bus']:.2f}, average rent ${walk['rent']:,.0f} a month.",
        f"Economy: unemployment {walk['unemployment']:.1f}%, inflation {walk['inflation']:.1f}%, "
        f"consumer confidence {walk['confidence']:.0f}.",
        "News:",
    ]
    news = [_capitalize(s) + "." for s in _CITY_BANKS["headline"] + _CITY_BANKS["info"]]
    more = lambda r: _pick(r, news)
    return _fill(rng, _from_list(items + _shuffled(rng, news), more), target - 1) + "\n"

  def opening(self, rng, everyone, target):
    head = "Day 1 begins. Citizens have not sent any messages yet."
    make = lambda r, k: _pick(r, ("News: ", "Notice: ")) + _capitalize(
        _format(r, _pick(r, ("{headline}.", "{info}.")), _CITY_BANKS))
    return _compose(rng, head, make, target - 1) + "\n"

  def tail(self, rng, round, agent, target):
    suffix = ("What do you do today? Give one short message to your friends and a one-line "
              f"plan.\n{agent.handle}:")
    head = f"It is the morning of day {round + 1}."
    make = lambda r, k: _pick(r, (
        "You are at home.", "You have just woken up.", "You are on your way to work.",
        "You feel rested.", "You feel a little hungry.", "Your phone shows new messages."))
    return "\n" + _compose(rng, head, make, target - 2 - len(suffix)) + "\n" + suffix


_WEATHER = ("sunny", "partly cloudy", "overcast", "light rain", "heavy rain", "windy",
            "hot and humid", "foggy")


def _city_walk(seed: int, round: int) -> dict:
  """The city's economy on day `round`: a seeded random walk, recomputed from day 0."""
  state = dict(rice=2.40, bread=3.10, bus=2.50, rent=1450.0, unemployment=6.2,
               inflation=3.1, confidence=98.0, temp=24.0, weather="sunny")
  for t in range(round + 1):
    rng = _rng(seed, _WALK, t)
    for key, rel in (("rice", 0.02), ("bread", 0.015), ("bus", 0.005), ("rent", 0.004)):
      state[key] *= 1.0 + rel * rng.standard_normal()
    state["unemployment"] = max(1.0, state["unemployment"] + 0.1 * rng.standard_normal())
    state["inflation"] += 0.05 * rng.standard_normal()
    state["confidence"] += 1.5 * rng.standard_normal()
    state["temp"] = min(40.0, max(-5.0, state["temp"] + 2.0 * rng.standard_normal()))
    state["weather"] = _pick(rng, _WEATHER)
  return state


# ---- Debate (Du et al.): a shared question, answers accumulated over rounds.

_QUESTIONS = (
    "A train leaves the station at 9:40 AM and travels 210 km at an average speed of 84 km/h. "
    "At what time does it arrive?",
    "How many prime numbers are there between 1 and 50?",
    "What is the sum of the interior angles of a regular hexagon, in degrees?",
    "A shop lowers a price by 20% and later raises the new price by 25%. What is the overall "
    "change in price?",
    "What is the least common multiple of 18, 24 and 30?",
    "Which chemical element has atomic number 26, and what is its symbol?",
    "A rectangle has a perimeter of 46 cm and an area of 120 square cm. What are its side "
    "lengths?",
    "In which year did the Berlin Wall fall, and how many years had it stood?",
    "If 3 workers build a wall in 12 days, how many days do 9 workers need at the same pace?",
)
_DEBATE_RULES = (
    "In the first round, solve the problem on your own.",
    "In later rounds you will see the answers of the other agents; use their reasoning as "
    "additional advice, point out mistakes, and change your answer only if you are convinced.",
    "Explain your reasoning step by step.",
    "State your final answer at the end of your response in the form (X).",
    "Be concise and do not repeat the question.",
    "Check every calculation twice before you commit to an answer.",
    "If two answers disagree, find the step where they diverge.",
    "Do not simply agree with the majority; the goal is the correct answer.",
)
_DEBATE_ROLES = (
    "a careful mathematician who checks every step", "a skeptical reviewer who looks for errors",
    "a fast mental calculator", "a patient tutor who explains simply",
    "a physics student who likes estimates and sanity checks",
    "a history teacher with a good memory for dates", "a chess player who thinks ahead",
    "an accountant who double-checks every number")
_DEBATE_STYLES = (
    "You write short, numbered steps.", "You prefer exact fractions to decimals.",
    "You say clearly when you are unsure.", "You like to verify an answer in a second way.",
    "You keep your explanations brief.", "You respond politely but firmly to disagreement.",
    "You avoid rounding until the last step.")
_DEBATE_HINTS = (
    "Keep your answer under 300 words.", "Show the key intermediate results.",
    "If you change your answer, say why.", "Write the final answer only once.",
    "Name any assumption you make.", "Point out the first wrong step you find, if any.")


def _arithmetic_question(rng) -> str:
  a, b, c, d, e, f = (int(x) for x in rng.integers(0, 30, size=6))
  return f"What is the result of {a}+{b}*{c}+{d}-{e}*{f}?"


class _Debate(_Flavor):
  """Multi-agent debate: the question in the shared system text, no private memory."""

  named_headers = False  # answers are anonymous, as in Du et al.

  def system(self, rng, everyone, target):
    n_agents = len(everyone.others)
    question = _arithmetic_question(rng) if rng.random() < 0.5 else _pick(rng, _QUESTIONS)
    head = (f"You are one of {n_agents} agents debating the answer to a question.\n"
            f"Question: {question}\n")
    tail = "\n"
    make = _from_list(_DEBATE_RULES, lambda r: _pick(r, _DEBATE_RULES))
    return head + _fill(rng, make, target - len(head) - len(tail)) + tail

  def persona(self, rng, agent, target):
    head = f"You are {agent.handle}, {_pick(rng, _DEBATE_ROLES)}."
    make = lambda r, k: _pick(r, _DEBATE_STYLES)
    return _compose(rng, head, make, target - 1) + "\n"

  def memory(self, rng, agent, target):
    make = lambda r, k: _pick(r, _DEBATE_STYLES)
    return _compose(rng, "Notes to self:", make, target - 1) + "\n"

  def env(self, rng, round, walk, everyone, target):
    head = f"Debate status: round {round}."
    make = lambda r, k: _pick(r, _DEBATE_RULES)
    return _compose(rng, head, make, target - 1) + "\n"

  def opening(self, rng, everyone, target):
    return "This is the first round. No other agent has answered yet.\n"

  def history_header(self, round):
    return f"\nYour answer in round {round}:\n"

  def tail(self, rng, round, agent, target):
    if round == 0:
      text = ("Answer the question. Explain your reasoning step by step, and put your final "
              "answer in the form (X) at the end of your response.")
    else:
      text = ("These are the solutions to the problem from other agents. Using the reasoning "
              "from other agents as additional advice, can you give an updated answer? Examine "
              "your solution and that of the other agents step by step. Put your answer in the "
              "form (X) at the end of your response.")
    suffix = f"\n{agent.handle}:"
    make = lambda r, k: _pick(r, _DEBATE_HINTS)
    return "\n" + _compose(rng, text, make, target - 1 - len(suffix)) + suffix


_FLAVOR_IMPLS: dict[str, _Flavor] = {
    "generative_agents": _Town(), "agent_society": _City(), "debate": _Debate()}


# --------------------------------------------------------------------------
# The workload.


class Workload:
  """Prompts of every agent in every round of one seeded multi-agent run."""

  def __init__(self, cfg: WorkloadConfig):
    if not isinstance(cfg, WorkloadConfig):
      raise ValueError(f"cfg={cfg!r} must be a WorkloadConfig")
    cfg.validate()
    self.cfg = cfg
    self._flavor = _FLAVOR_IMPLS[cfg.preset]
    self.agents = [f"agent{i}" for i in range(cfg.n_agents)]
    self.names = _person_names(cfg.seed, cfg.n_agents)
    self._people = [self._person(i) for i in range(cfg.n_agents)]
    self._everyone = _Agent(index=-1, handle="all", name="", others=tuple(self.names))
    self.system_text = self._flavor.system(
        _rng(cfg.seed, _SYSTEM), self._everyone, _chars(cfg.sys_tokens))
    self.opening_text = self._flavor.opening(
        _rng(cfg.seed, _OPENING), self._everyone, _chars(min(max(cfg.out_tokens_median, 24), 160)))
    self.persona_texts = [self._sized(_PERSONA, i, cfg.persona_tokens, self._flavor.persona)
                          for i in range(cfg.n_agents)]
    self.memory_texts = [self._sized(_MEMORY, i, cfg.private_mem_tokens, self._flavor.memory)
                         for i in range(cfg.n_agents)]
    self._env_cache: dict[int, str] = {}

  def _person(self, i: int) -> _Agent:
    n = self.cfg.n_agents
    # A handful of acquaintances, so memories mention real other agents.
    rng = _rng(self.cfg.seed, _NAMES, 1, i)
    pool = [j for j in range(n) if j != i]
    picks = rng.permutation(pool)[:6] if pool else []
    return _Agent(index=i, handle=self.agents[i], name=self.names[i],
                  others=tuple(self.names[int(j)] for j in picks))

  def _sized(self, stream: int, i: int, bounds: tuple[int, int], compose) -> str:
    rng = _rng(self.cfg.seed, stream, i)
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
    z = _rng(self.cfg.seed, _OUT, round, agent).standard_normal()
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
      rng = _rng(cfg.seed, _TOPO, src_round, i)
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
    rng = _rng(self.cfg.seed, _ORDER, src_round, i)
    chosen = sorted(chosen)
    return [chosen[int(p)] for p in rng.permutation(len(chosen))]

  # ---- Text pieces.

  def env_text(self, round: int) -> str:
    """The shared world state of `round` ("" when shared_env_tokens is 0)."""
    if self.cfg.shared_env_tokens == 0:
      return ""
    if round not in self._env_cache:
      walk = _city_walk(self.cfg.seed, round)
      self._env_cache[round] = self._flavor.env(
          _rng(self.cfg.seed, _ENV, round), round, walk, self._everyone,
          _chars(self.cfg.shared_env_tokens))
    return self._env_cache[round]

  def tail_text(self, round: int, agent: int) -> str:
    """Agent `agent`'s private closing question in `round`, ending in its handle and ":"."""
    self._check(round, agent)
    rng = _rng(self.cfg.seed, _TAIL, round, agent)
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
