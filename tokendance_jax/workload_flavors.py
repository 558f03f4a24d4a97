"""The text flavors of the workload presets: how each piece of a prompt is composed.

A flavor builds the system text, personas, memories, world state, opening and
tails of one preset to a character target, from the text banks in
`tokendance_jax/data/workload_<flavor>.json` (see `workload_text`):

- `generative_agents`: Smallville (identity summaries, retrieved memories, hourly rounds);
- `agent_society`: a city with an economy, news and social networks;
- `debate` (Du et al.): a shared question, answers accumulated over rounds.

`FLAVOR_IMPLS` maps each preset to its flavor; `city_walk` is the city's
economy, a seeded random walk over the rounds.
"""

from __future__ import annotations

import dataclasses

from tokendance_jax.workload_text import (
  CITY_SLOTS,
  TOWN_SLOTS,
  WALK,
  capitalize,
  clock,
  compose,
  fill,
  fill_slots,
  from_list,
  int_between,
  money,
  pick,
  seeded_rng,
  shuffled,
  text_banks,
  traits,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Agent:
  index: int
  handle: str  # "agent3"
  name: str  # "Isabella Rodriguez"
  others: tuple[str, ...]  # other agents' names, for memories and relationships


class Flavor:
  """Base: subclasses provide the per-piece composers."""

  named_headers = True  # "Agent 5 (Leo Haddad) said:" rather than "Agent 5 said:"

  # `everyone` is a pseudo-agent whose `others` are all the agents' names, for shared text.
  def system(self, rng, everyone: Agent, target: int) -> str:
    raise NotImplementedError

  def persona(self, rng, agent: Agent, target: int) -> str:
    raise NotImplementedError

  def memory(self, rng, agent: Agent, target: int) -> str:
    raise NotImplementedError

  def env(self, rng, round: int, walk: dict, everyone: Agent, target: int) -> str:
    raise NotImplementedError

  def opening(self, rng, everyone: Agent, target: int) -> str:
    raise NotImplementedError

  def tail(self, rng, round: int, agent: Agent, target: int) -> str:
    raise NotImplementedError

  def history_header(self, round: int) -> str:
    return f"\nWhat I said in round {round}:\n"


# ---- Generative Agents: Smallville.


def _town_slots(agent: Agent) -> dict:
  """The `{slot}` banks of the town's templates, with `agent`'s acquaintances as `{other}`."""
  town = text_banks("workload_town")
  return {**{key: town[key] for key in TOWN_SLOTS}, "place": tuple(town["places"]),
          "trait": text_banks("workload_common")["trait"],
          "other": agent.others or ("a neighbor", "a stranger")}


def _town_event(rng, slots: dict) -> str:
  return capitalize(fill_slots(rng, pick(rng, text_banks("workload_town")["events"]), slots))


class _Town(Flavor):
  """Generative Agents (Smallville): identity summaries, retrieved memories, hourly rounds."""

  def system(self, rng, everyone, target):
    town = text_banks("workload_town")
    n_agents = len(everyone.others)
    head = (f"This is a simulation of Smallville, a small town with {n_agents} residents. You "
            "play one of the residents, and the others are played by other instances of you.")
    tail = (" Below are your identity summary, your relevant memories, and what the residents "
            "near you said during the last hour.\n")
    places = [f"{p}: {d}." for p, d in town["places"].items()]
    parts = shuffled(rng, town["rules"]) + ["About the town."] + shuffled(rng, places)
    slots = _town_slots(everyone)
    return compose(rng, head, from_list(parts, lambda r: _town_event(r, slots)), target, tail)

  def persona(self, rng, agent, target):
    town = text_banks("workload_town")
    first = agent.name.split()[0]
    innate = traits(rng, 3)  # drawn before the age
    head = (f"Name: {agent.name} ({agent.handle})\nAge: {int(rng.integers(19, 74))}\n"
            f"Innate traits: {innate}\nLearned traits: {first} is {pick(rng, town['job'])}.")
    slots = {**_town_slots(agent), "first": (first,)}
    lines = [
        f"Currently: {first} is " + fill_slots(rng, pick(rng, town["plans"]), slots),
        f"Lifestyle: {first} goes to bed around {int(rng.integers(9, 12))} PM, wakes up around "
        f"{int(rng.integers(5, 9))} AM, and eats dinner around {int(rng.integers(5, 8))} PM.",
    ]
    make = from_list(lines, lambda r: fill_slots(r, pick(r, town["persona_facts"]), slots))
    return compose(rng, head, make, target - 1, sep="\n") + "\n"

  def memory(self, rng, agent, target):
    memories = text_banks("workload_town")["memories"]
    head = f"Relevant memories of {agent.name}:"
    slots = _town_slots(agent)
    def make(r, k):
      return "- " + fill_slots(r, pick(r, memories), slots)
    return compose(rng, head, make, target - 1, sep="\n") + "\n"

  def env(self, rng, round, walk, everyone, target):
    hour = 7 + round
    weather = pick(rng, text_banks("workload_town")["weather"])
    head = f"Smallville update, {clock(hour)}: the weather is {weather}."
    slots = _town_slots(everyone)
    def make(r, k):
      return _town_event(r, slots)
    return compose(rng, head, make, target - 1) + "\n"

  def opening(self, rng, everyone, target):
    weather = pick(rng, text_banks("workload_town")["weather"])
    head = (f"It is 7:00 AM on February 13 in Smallville, and the town is waking up; the weather "
            f"is {weather}. Nobody has spoken yet today.")
    slots = _town_slots(everyone)
    def make(r, k):
      return _town_event(r, slots)
    return compose(rng, head, make, target - 1) + "\n"

  def tail(self, rng, round, agent, target):
    town = text_banks("workload_town")
    first = agent.name.split()[0]
    hour = 8 + round
    day = 13 + hour // 24
    suffix = f"What do you do next? Answer in two sentences.\n{agent.handle}:"
    head = f"It is {clock(hour)} on February {day}."
    places = tuple(town["places"])
    here, there = (places[int(j)] for j in rng.choice(len(places), 2, False))
    make = from_list(
        [f"{first} is at {here}.", f"{first} is {pick(rng, town['state'])}.",
         f"{first} could go to {there} next or stay put."],
        lambda r: f"{first} has no fixed plans for the next hour.")
    return "\n" + compose(rng, head, make, target - 2 - len(suffix)) + "\n" + suffix


# ---- AgentSociety: a city with an economy, news and social networks.


def _city_slots(agent: Agent) -> dict:
  """The `{slot}` banks of the city's templates, with `agent`'s friends as `{other}`."""
  city = text_banks("workload_city")
  return {**{key: city[key] for key in CITY_SLOTS}, "district": tuple(city["districts"]),
          "amount": money(8, 240), "pct": int_between(2, 15),
          "trait": text_banks("workload_common")["trait"],
          "other": agent.others or ("a neighbor", "a colleague")}


class _City(Flavor):
  """AgentSociety: shared world state, private profile and status, short messages."""

  def system(self, rng, everyone, target):
    city = text_banks("workload_city")
    n_agents = len(everyone.others)
    head = (f"You are a citizen of a simulated city with {n_agents} residents, part of a "
            "large-scale social simulation. Every step is one simulated day: all citizens act at "
            "the same time, and the city updates its economy and news after each step.")
    tail = (" The current world state, your profile and status, your recent incidents, and the "
            "latest messages from other citizens follow.\n")
    districts = [f"{d}: {t}." for d, t in city["districts"].items()]
    parts = shuffled(rng, city["rules"]) + ["The districts of the city."] + districts
    slots = _city_slots(everyone)
    def more(r):
      return "Recent news: " + capitalize(fill_slots(r, "{headline}.", slots))
    return compose(rng, head, from_list(parts, more), target, tail)

  def persona(self, rng, agent, target):
    city = text_banks("workload_city")
    first = agent.name.split()[0]
    job = pick(rng, city["job"])
    home = pick(rng, tuple(city["districts"]))
    age = int(rng.integers(18, 80))
    head = f"Profile: {agent.name} ({agent.handle}), {age}, {job}, lives in {home}."
    facts = shuffled(rng, [
        f"Monthly income: ${int(rng.integers(9, 70)) * 100:,}.",
        f"Savings: ${int(rng.integers(0, 400)) * 100:,}.",
        f"Family: {pick(rng, city['family'])}.",
        f"Education: {pick(rng, city['education'])}.",
        f"Personality: {traits(rng, 2)}.",
        f"Values: {pick(rng, city['values'])}.",
        f"Hobby: {pick(rng, city['hobby'])}.",
    ])
    status = (f"Status: satiety {rng.uniform(0.2, 1):.1f}, energy {rng.uniform(0.2, 1):.1f}, "
              f"mood {pick(rng, city['feeling'])}.")
    slots = _city_slots(agent)
    make = from_list([status] + facts, lambda r: fill_slots(
        r, f"{first} is friends with {{other}} and often talks about {{topic}}.", slots))
    return compose(rng, head, make, target - 1) + "\n"

  def memory(self, rng, agent, target):
    incidents = text_banks("workload_city")["incidents"]
    slots = _city_slots(agent)
    def make(r, k):
      return "- " + fill_slots(r, pick(r, incidents), slots)
    return compose(rng, "Recent incidents:", make, target - 1, sep="\n") + "\n"

  def env(self, rng, round, walk, everyone, target):
    city = text_banks("workload_city")
    items = [
        f"World state, day {round + 1}.",
        f"Weather: {walk['weather']}, high of {walk['temp']:.0f} C.",
        f"Prices: rice ${walk['rice']:.2f} per kg, bread ${walk['bread']:.2f}, bus ticket "
        f"${walk['bus']:.2f}, average rent ${walk['rent']:,.0f} a month.",
        f"Economy: unemployment {walk['unemployment']:.1f}%, inflation {walk['inflation']:.1f}%, "
        f"consumer confidence {walk['confidence']:.0f}.",
        "News:",
    ]
    news = [capitalize(s) + "." for s in city["headline"] + city["info"]]
    def more(r):
      return pick(r, news)
    return fill(rng, from_list(items + shuffled(rng, news), more), target - 1) + "\n"

  def opening(self, rng, everyone, target):
    city = text_banks("workload_city")
    head = "Day 1 begins. Citizens have not sent any messages yet."
    slots = _city_slots(everyone)
    def make(r, k):
      kind = pick(r, city["bulletin_kinds"])  # drawn before the bulletin
      return kind + capitalize(fill_slots(r, pick(r, city["bulletins"]), slots))
    return compose(rng, head, make, target - 1) + "\n"

  def tail(self, rng, round, agent, target):
    morning = text_banks("workload_city")["morning"]
    suffix = ("What do you do today? Give one short message to your friends and a one-line "
              f"plan.\n{agent.handle}:")
    head = f"It is the morning of day {round + 1}."
    def make(r, k):
      return pick(r, morning)
    return "\n" + compose(rng, head, make, target - 2 - len(suffix)) + "\n" + suffix


def city_walk(seed: int, round: int) -> dict:
  """The city's economy on day `round`: a seeded random walk, recomputed from day 0."""
  weather = text_banks("workload_city")["weather"]
  state = dict(rice=2.40, bread=3.10, bus=2.50, rent=1450.0, unemployment=6.2,
               inflation=3.1, confidence=98.0, temp=24.0, weather="sunny")
  for t in range(round + 1):
    rng = seeded_rng(seed, WALK, t)
    for key, rel in (("rice", 0.02), ("bread", 0.015), ("bus", 0.005), ("rent", 0.004)):
      state[key] *= 1.0 + rel * rng.standard_normal()
    state["unemployment"] = max(1.0, state["unemployment"] + 0.1 * rng.standard_normal())
    state["inflation"] += 0.05 * rng.standard_normal()
    state["confidence"] += 1.5 * rng.standard_normal()
    state["temp"] = min(40.0, max(-5.0, state["temp"] + 2.0 * rng.standard_normal()))
    state["weather"] = pick(rng, weather)
  return state


# ---- Debate (Du et al.): a shared question, answers accumulated over rounds.


def _arithmetic_question(rng) -> str:
  a, b, c, d, e, f = (int(x) for x in rng.integers(0, 30, size=6))
  return f"What is the result of {a}+{b}*{c}+{d}-{e}*{f}?"


class _Debate(Flavor):
  """Multi-agent debate: the question in the shared system text, no private memory."""

  named_headers = False  # answers are anonymous, as in Du et al.

  def system(self, rng, everyone, target):
    debate = text_banks("workload_debate")
    n_agents = len(everyone.others)
    question = (_arithmetic_question(rng) if rng.random() < 0.5
                else pick(rng, debate["questions"]))
    head = (f"You are one of {n_agents} agents debating the answer to a question.\n"
            f"Question: {question}\n")
    tail = "\n"
    make = from_list(debate["rules"], lambda r: pick(r, debate["rules"]))
    return head + fill(rng, make, target - len(head) - len(tail)) + tail

  def persona(self, rng, agent, target):
    debate = text_banks("workload_debate")
    head = f"You are {agent.handle}, {pick(rng, debate['roles'])}."
    def make(r, k):
      return pick(r, debate["styles"])
    return compose(rng, head, make, target - 1) + "\n"

  def memory(self, rng, agent, target):
    styles = text_banks("workload_debate")["styles"]
    def make(r, k):
      return pick(r, styles)
    return compose(rng, "Notes to self:", make, target - 1) + "\n"

  def env(self, rng, round, walk, everyone, target):
    rules = text_banks("workload_debate")["rules"]
    head = f"Debate status: round {round}."
    def make(r, k):
      return pick(r, rules)
    return compose(rng, head, make, target - 1) + "\n"

  def opening(self, rng, everyone, target):
    return "This is the first round. No other agent has answered yet.\n"

  def history_header(self, round):
    return f"\nYour answer in round {round}:\n"

  def tail(self, rng, round, agent, target):
    hints = text_banks("workload_debate")["hints"]
    if round == 0:
      text = ("Answer the question. Explain your reasoning step by step, and put your final "
              "answer in the form (X) at the end of your response.")
    else:
      text = ("These are the solutions to the problem from other agents. Using the reasoning "
              "from other agents as additional advice, can you give an updated answer? Examine "
              "your solution and that of the other agents step by step. Put your answer in the "
              "form (X) at the end of your response.")
    suffix = f"\n{agent.handle}:"
    def make(r, k):
      return pick(r, hints)
    return "\n" + compose(rng, text, make, target - 1 - len(suffix)) + suffix


FLAVOR_IMPLS: dict[str, Flavor] = {
    "generative_agents": _Town(), "agent_society": _City(), "debate": _Debate()}
