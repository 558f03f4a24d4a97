"""Seeding, text composition and text-bank loading for the workload generators.

Every random draw of a workload comes from `seeded_rng(seed, stream, *keys)`,
one stream per kind of text (the constants below), so a piece of text depends
only on the seed and its own keys, never on call order.

The text banks (names, places, sentence templates ...) live in JSON files
under `tokendance_jax/data/`; `text_banks(name)` reads one file once and checks
its shape. A file maps each bank's name to a non-empty list of distinct,
non-empty strings, or to an object of such strings (names to descriptions).
`BANK_FILES` lists every file the generators read, with the banks each must hold.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import types
from collections.abc import Callable, Mapping, Sequence

import numpy as np

# Seed streams, one per kind of draw.
SYSTEM, PERSONA, MEMORY, ENV, OPENING, TAIL, OUT, TOPO, ORDER, NAMES, WALK = range(11)

TOWN_SLOTS = ("activity", "when", "feeling", "event_other", "favor", "deadline", "topic",
              "gossip", "self_activity", "observation", "weather", "state", "interest")
CITY_SLOTS = ("when", "feeling", "topic", "purpose", "event_other", "headline", "info", "values",
              "hobby", "family", "education")
BANK_FILES: dict[str, tuple[str, ...]] = {
    "workload_common": ("first_name", "last_name", "trait"),
    "workload_town": ("places", "job", *TOWN_SLOTS, "rules", "plans", "persona_facts",
                      "memories", "events"),
    "workload_city": ("districts", "job", *CITY_SLOTS, "rules", "incidents", "weather",
                      "bulletin_kinds", "bulletins", "morning"),
    "workload_debate": ("questions", "rules", "roles", "styles", "hints"),
}

Bank = tuple[str, ...] | Mapping[str, str]


def data_dir():
  """The folder of the bank files (an importlib.resources Traversable)."""
  return importlib.resources.files("tokendance_jax").joinpath("data")


@functools.cache
def text_banks(name: str) -> Mapping[str, Bank]:
  """The banks of `data/<name>.json`, read once; lists become tuples, objects read-only maps.

  Raises FileNotFoundError for a missing file and ValueError for a malformed one
  (not JSON, a bank missing from BANK_FILES[name], empty, repeated or non-string
  entries), each naming the file.
  """
  where = f"workload text bank file tokendance_jax/data/{name}.json"
  path = data_dir().joinpath(f"{name}.json")
  try:
    text = path.read_text(encoding="utf-8")
  except FileNotFoundError:
    raise FileNotFoundError(f"{where} is missing (looked for {path})") from None

  def no_repeated_keys(pairs):
    keys = [k for k, _ in pairs]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
      raise ValueError(f"{where} repeats the key(s) {', '.join(repeated)}")
    return dict(pairs)

  try:
    data = json.loads(text, object_pairs_hook=no_repeated_keys)
  except json.JSONDecodeError as e:
    raise ValueError(f"{where} is not valid JSON: {e}") from None
  if not isinstance(data, dict):
    raise ValueError(f"{where} must hold a JSON object of banks")
  missing = [key for key in BANK_FILES.get(name, ()) if key not in data]
  if missing:
    raise ValueError(f"{where} lacks the bank(s) {', '.join(missing)}")
  return types.MappingProxyType({key: _checked(where, key, value) for key, value in data.items()})


def _checked(where: str, key: str, value) -> Bank:
  if not isinstance(value, (list, dict)) or not value:
    raise ValueError(f"{where}: bank {key!r} must be a non-empty list or object of strings")
  entries = [*value, *value.values()] if isinstance(value, dict) else value
  if not all(isinstance(v, str) and v for v in entries):
    raise ValueError(f"{where}: bank {key!r} holds an empty or non-string entry")
  if isinstance(value, list):
    repeated = sorted({v for v in value if value.count(v) > 1})
    if repeated:
      raise ValueError(f"{where}: bank {key!r} repeats {', '.join(map(repr, repeated))}")
    return tuple(value)
  return types.MappingProxyType(value)


# --------------------------------------------------------------------------
# Seeded draws and text composition.


def seeded_rng(seed: int, stream: int, *keys: int) -> np.random.Generator:
  return np.random.default_rng([seed, stream, *keys])


def pick(rng: np.random.Generator, seq: Sequence):
  return seq[int(rng.integers(len(seq)))]


class Slots(dict):
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
      value = pick(self.rng, fresh)
    self[key] = value
    return value


def fill_slots(rng: np.random.Generator, template: str, banks: dict) -> str:
  return template.format_map(Slots(rng, banks))


def fill(rng: np.random.Generator, make: Callable[[np.random.Generator, int], str],
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


def compose(rng, head: str, make, target: int, tail: str = "", sep: str = " ") -> str:
  """`head`, then parts from `make` up to `target` characters in all, then `tail`."""
  body = fill(rng, make, max(0, target - len(head) - len(tail) - len(sep)), sep=sep)
  joined = head + (sep + body if body and head else body)
  return joined + tail


def from_list(items: Sequence[str], then: Callable[[np.random.Generator], str]):
  """A `make` for `fill`: the items in order, then `then(rng)` parts."""
  def make(rng, k):
    return items[k] if k < len(items) else then(rng)
  return make


def shuffled(rng: np.random.Generator, items: Sequence[str]) -> list[str]:
  return [items[i] for i in rng.permutation(len(items))]


def capitalize(text: str) -> str:
  return text[:1].upper() + text[1:]


def clock(hour: int) -> str:
  h = hour % 12 or 12
  return f"{h}:00 {'AM' if hour % 24 < 12 else 'PM'}"


def money(low: float, high: float) -> Callable[[np.random.Generator], str]:
  return lambda rng: f"${rng.uniform(low, high):,.0f}"


def int_between(low: int, high: int) -> Callable[[np.random.Generator], str]:
  return lambda rng: str(int(rng.integers(low, high + 1)))


def traits(rng, n: int) -> str:
  """n distinct personality traits, comma-separated."""
  bank = text_banks("workload_common")["trait"]
  return ", ".join(bank[int(i)] for i in rng.choice(len(bank), n, replace=False))


def person_names(seed: int, n: int) -> list[str]:
  """n distinct full names; agent i's name depends on the seed only, not on n."""
  banks = text_banks("workload_common")
  first_names, last_names = banks["first_name"], banks["last_name"]
  combos = len(first_names) * len(last_names)
  perm = seeded_rng(seed, NAMES).permutation(combos)
  names = []
  for i in range(n):
    c = int(perm[i % combos])
    first, last = first_names[c // len(last_names)], last_names[c % len(last_names)]
    middle = "" if i < combos else f" {chr(ord('A') + (i // combos - 1) % 26)}."
    names.append(f"{first}{middle} {last}")
  return names
