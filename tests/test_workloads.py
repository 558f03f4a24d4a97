"""Workload generators: seeded, laid out per topology/order/mode, sized, English text."""

import dataclasses
import json
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokendance_jax import workload_text
from tokendance_jax import workloads as W
from tokendance_jax.workloads import OutputRef, TextSegment, Workload, WorkloadConfig


def small(**kw) -> WorkloadConfig:
  base = dict(n_agents=6, rounds=4, sys_tokens=150, persona_tokens=(40, 80),
              private_mem_tokens=(50, 100), tail_tokens=40, out_tokens_median=32)
  return WorkloadConfig(**{**base, **kw})


def shared_refs(items) -> list[tuple[int, int]]:
  return [(x.agent, x.round) for x in items if isinstance(x, OutputRef) and not x.private]


def private_refs(items) -> list[tuple[int, int]]:
  return [(x.agent, x.round) for x in items if isinstance(x, OutputRef) and x.private]


def segments(items) -> list[TextSegment]:
  return [x for x in items if isinstance(x, TextSegment)]


# ---- Determinism.


def test_same_seed_same_prompts_in_any_call_order():
  cfg = small(topology="k_random", k=2, order="random_per_agent", shared_env_tokens=50)
  a, b = Workload(cfg), Workload(cfg)
  keys = [(r, i) for r in range(cfg.rounds) for i in range(cfg.n_agents)]
  got_a = {key: a.prompt(*key) for key in keys}
  got_b = {key: b.prompt(*key) for key in reversed(keys)}
  assert got_a == got_b
  assert [a.max_tokens(*k) for k in keys] == [b.max_tokens(*k) for k in reversed(keys)][::-1]


def test_different_seeds_differ():
  a, b = Workload(small(seed=0)), Workload(small(seed=1))
  assert a.system_text != b.system_text
  assert a.persona_texts != b.persona_texts
  assert a.memory_texts != b.memory_texts
  keys = [(r, i) for r in range(4) for i in range(6)]
  assert [a.max_tokens(*k) for k in keys] != [b.max_tokens(*k) for k in keys]


def test_agent_text_does_not_depend_on_n_agents():
  a, b = Workload(small(n_agents=6)), Workload(small(n_agents=9))
  assert a.names == b.names[:6]


# ---- Layout.


def test_layout_order_of_pieces():
  w = Workload(small(shared_env_tokens=40))
  items = w.prompt(2, 3)
  names = [x.name for x in segments(items)]
  assert names[:4] == ["system", "env:r2", "persona:agent3", "memory:agent3"]
  assert names[-1] == "tail:agent3"
  assert items[-1].text.endswith("agent3:")
  # Private history (own outputs) sits before the shared output blocks.
  kinds = ["priv" if x.private else "shared" for x in items if isinstance(x, OutputRef)]
  assert kinds == sorted(kinds, key=lambda k: k != "priv")


@pytest.mark.parametrize("topology,agent,expected", [
    ("all", 3, [0, 1, 2, 3, 4, 5]),
    ("all_but_self", 3, [0, 1, 2, 4, 5]),
    ("spatial_k", 0, [1, 2, 4, 5]),  # ring of 6, k=4: +1, -1, +2, -2
    ("spatial_k", 3, [1, 2, 4, 5]),
])
def test_topology_canonical(topology, agent, expected):
  w = Workload(small(topology=topology, k=4))
  assert shared_refs(w.prompt(1, agent)) == [(j, 0) for j in expected]
  assert w.visible(0, agent) == expected


def test_k_random_sees_k_distinct_others():
  cfg = small(n_agents=10, topology="k_random", k=3)
  w = Workload(cfg)
  sets = []
  for r in range(1, cfg.rounds):
    for i in range(cfg.n_agents):
      seen = [j for j, _ in shared_refs(w.prompt(r, i))]
      assert len(seen) == 3 and len(set(seen)) == 3 and i not in seen
      assert seen == sorted(seen)
      sets.append(tuple(seen))
  assert len(set(sets)) > 5  # re-drawn per round and agent


@pytest.mark.parametrize("topology,expected", [
    ("all", [4, 5, 0, 1, 2, 3]),
    ("all_but_self", [4, 5, 0, 1, 2]),
])
def test_rotate_to_self(topology, expected):
  w = Workload(small(topology=topology, order="rotate_to_self"))
  assert [j for j, _ in shared_refs(w.prompt(1, 3))] == expected


def test_random_per_agent_is_a_seeded_shuffle():
  w = Workload(small(order="random_per_agent", n_agents=8))
  orders = [[j for j, _ in shared_refs(w.prompt(r, i))] for r in (1, 2) for i in range(8)]
  assert all(sorted(o) == list(range(8)) for o in orders)
  assert len({tuple(o) for o in orders}) > 1
  assert orders == [[j for j, _ in shared_refs(Workload(w.cfg).prompt(r, i))]
                    for r in (1, 2) for i in range(8)]


def test_rerender_shows_only_last_round():
  w = Workload(small(topology="all_but_self"))
  for r in range(1, 4):
    assert shared_refs(w.prompt(r, 2)) == [(j, r - 1) for j in (0, 1, 3, 4, 5)]


def test_accumulate_grows_in_round_order():
  w = Workload(small(topology="all_but_self", context_mode="accumulate"))
  for r in range(1, 4):
    refs = shared_refs(w.prompt(r, 2))
    assert refs == [(j, src) for src in range(r) for j in (0, 1, 3, 4, 5)]
  headers = [s for s in segments(w.prompt(3, 2)) if s.name.startswith("header:")]
  assert headers[0].name == "header:agent0:r0"
  assert headers[0].text == f"\nAgent 0 ({w.names[0]}) said (round 0):\n"
  assert headers[-1].name == "header:agent5:r2"


def test_accumulate_blocks_keep_their_place_with_random_topology():
  """Round r's shared blocks are round r-1's blocks plus the newest round."""
  w = Workload(small(topology="k_random", k=2, order="random_per_agent",
                     context_mode="accumulate"))
  for i in range(6):
    prev = shared_refs(w.prompt(2, i))
    assert shared_refs(w.prompt(3, i))[:len(prev)] == prev


def test_round_zero_has_no_outputs_but_an_opening():
  for name in W.PRESETS:
    w = Workload(W.preset(name, n_agents=4))
    for i in range(4):
      items = w.prompt(0, i)
      assert not any(isinstance(x, OutputRef) for x in items)
      opening = [s for s in segments(items) if s.name == "opening"]
      assert len(opening) == 1 and opening[0].shared
    assert all(s.name != "opening" for s in segments(w.prompt(1, 0)))


def test_own_history_is_private_and_from_earlier_rounds():
  w = Workload(small(topology="all"))
  for r in range(4):
    items = w.prompt(r, 4)
    assert private_refs(items) == [(4, past) for past in range(r)]
    history = [s for s in segments(items) if s.name.startswith("history:")]
    assert len(history) == r and not any(s.shared for s in history)
  # With topology "all" the agent's own last output is also a shared block.
  assert (4, 2) in shared_refs(w.prompt(3, 4))


def test_private_and_shared_marks():
  w = Workload(small(shared_env_tokens=40))
  for s in segments(w.prompt(1, 1)):
    kind = s.name.split(":")[0]
    assert s.shared == (kind in ("system", "env", "opening", "header")), s.name


def test_shared_segments_identical_across_agents():
  for name in W.PRESETS:
    w = Workload(W.preset(name, n_agents=8, topology="all"))
    for r in range(min(3, w.cfg.rounds)):
      by_name: dict[str, set[str]] = {}
      for i in range(8):
        for s in segments(w.prompt(r, i)):
          if s.shared:
            by_name.setdefault(s.name, set()).add(s.text)
      assert all(len(texts) == 1 for texts in by_name.values()), name
      assert "system" in by_name


def test_env_changes_every_round_and_is_shared():
  w = Workload(W.preset("agent_society", n_agents=5))
  envs = [w.env_text(r) for r in range(5)]
  assert len(set(envs)) == 5
  assert all(f"day {r + 1}" in envs[r] for r in range(5))
  assert not any(s.name.startswith("env") for s in segments(Workload(small()).prompt(1, 0)))


# ---- Sizes and text.


def within(text: str, tokens: float, tol: float = 0.4) -> bool:
  return abs(len(text) / 4 - tokens) <= tol * tokens


@pytest.mark.parametrize("name", list(W.PRESETS))
def test_sizes_match_targets(name):
  cfg = W.preset(name, n_agents=12, shared_env_tokens=W.PRESETS[name].shared_env_tokens or 120)
  w = Workload(cfg)
  assert within(w.system_text, cfg.sys_tokens)
  assert within(w.env_text(1), cfg.shared_env_tokens)
  for lo_hi, texts in ((cfg.persona_tokens, w.persona_texts),
                       (cfg.private_mem_tokens, w.memory_texts)):
    for text in texts:
      assert lo_hi[0] * 0.6 <= len(text) / 4 <= lo_hi[1] * 1.4 + 1
  for r in range(cfg.rounds):
    assert within(w.tail_text(r, 1), cfg.tail_tokens)


def test_max_tokens_lognormal_clipped():
  cfg = small(n_agents=50, rounds=10, out_tokens_median=64, out_tokens_clip=(16, 256))
  w = Workload(cfg)
  caps = sorted(w.max_tokens(r, i) for r in range(10) for i in range(50))
  assert 16 <= caps[0] and caps[-1] <= 256
  assert 54 <= caps[len(caps) // 2] <= 74
  assert len(set(caps)) > 40


@pytest.mark.parametrize("name", list(W.PRESETS))
def test_presets_yield_english_prompts(name):
  w = Workload(W.preset(name))
  for r in range(w.cfg.rounds):
    for i in (0, w.cfg.n_agents - 1):
      items = w.prompt(r, i)
      for s in segments(items):
        assert s.text and "{" not in s.text and "}" not in s.text, s.name
        assert s.text.isascii()
      words = " ".join(s.text for s in segments(items)).split()
      alpha = sum(word.strip(".,:;()?!'-").isalpha() for word in words)
      assert alpha > 0.8 * len(words)


def test_private_share_of_presets():
  """AgentSociety prompts are mostly shared; Smallville's carry much more private text."""
  def share(name):
    w = Workload(W.preset(name))
    out = 4 * w.cfg.out_tokens_median
    shares = [W.private_share(w.prompt(2, i), out) for i in range(w.cfg.n_agents)]
    return sum(shares) / len(shares)
  assert 0.04 < share("agent_society") < 0.15
  assert share("agent_society") < share("debate") < share("generative_agents")


def test_render_with_markers():
  w = Workload(small())
  text = W.render(w.prompt(1, 0), markers=True)
  assert text.startswith("<<system|shared>>")
  assert "<<output:agent0:r0|private>>" in text and "<<output:agent0:r0|shared>>" in text
  plain = W.render(w.prompt(1, 0), output=lambda ref: "X")
  assert "<<" not in plain and plain.endswith("agent0:")


# ---- Validation.


@pytest.mark.parametrize("field,value", [
    ("preset", "smallville"),
    ("n_agents", 0),
    ("n_agents", 2.5),
    ("n_agents", True),
    ("rounds", 0),
    ("sys_tokens", -1),
    ("persona_tokens", (300, 100)),
    ("persona_tokens", (100,)),
    ("private_mem_tokens", (-1, 10)),
    ("tail_tokens", -5),
    ("out_tokens_median", 0),
    ("out_tokens_clip", (0, 10)),
    ("topology", "ring"),
    ("k", 0),
    ("order", "sorted"),
    ("context_mode", "append"),
    ("shared_env_tokens", -1),
    ("seed", -1),
])
def test_bad_config_names_the_field(field, value):
  with pytest.raises(ValueError, match=field):
    WorkloadConfig(**{field: value})


def test_k_larger_than_others():
  with pytest.raises(ValueError, match="k=6"):
    WorkloadConfig(n_agents=6, topology="k_random", k=6)
  WorkloadConfig(n_agents=6, topology="all", k=6)  # k is unused there


def test_workload_validates_config():
  cfg = WorkloadConfig()
  object.__setattr__(cfg, "rounds", 0)  # bypassing __post_init__
  with pytest.raises(ValueError, match="rounds"):
    Workload(cfg)
  with pytest.raises(ValueError, match="cfg"):
    Workload({"n_agents": 3})


def test_prompt_index_checks():
  w = Workload(small())
  with pytest.raises(ValueError, match="round"):
    w.prompt(4, 0)
  with pytest.raises(ValueError, match="agent"):
    w.prompt(0, 6)
  with pytest.raises(ValueError, match="round"):
    w.max_tokens(-1, 0)


def test_unknown_preset_lists_valid_names():
  with pytest.raises(ValueError) as e:
    W.preset("smallville")
  for name in W.PRESETS:
    assert name in str(e.value)
  with pytest.raises(ValueError, match="n_agent"):
    W.preset("debate", n_agent=3)


def test_preset_overrides_and_lists():
  cfg = W.preset("debate", n_agents=3, rounds=2)
  assert (cfg.n_agents, cfg.rounds, cfg.context_mode) == (3, 2, "accumulate")
  assert W.preset("generative_agents").out_tokens_median == 48
  as_list = dataclasses.replace(cfg, persona_tokens=[40, 60])
  assert as_list.persona_tokens == (40, 60) and hash(as_list)


# ---- Invariants over random configurations.


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 9), rounds=st.integers(1, 4), seed=st.integers(0, 2**31),
       topology=st.sampled_from(W.TOPOLOGIES), order=st.sampled_from(W.ORDERS),
       mode=st.sampled_from(W.CONTEXT_MODES), k=st.integers(1, 8))
def test_layout_invariants(n, rounds, seed, topology, order, mode, k):
  cfg = small(n_agents=n, rounds=rounds, seed=seed, topology=topology, order=order,
              context_mode=mode, k=min(k, n - 1), sys_tokens=30, persona_tokens=(5, 10),
              private_mem_tokens=(0, 10), tail_tokens=10)
  w = Workload(cfg)
  for r in range(rounds):
    for i in range(n):
      items = w.prompt(r, i)
      shared = shared_refs(items)
      assert all(src < r for _, src in shared)
      assert len(set(shared)) == len(shared)
      srcs = [src for _, src in shared]
      assert srcs == sorted(srcs)
      if mode == "rerender":
        assert set(srcs) <= {r - 1}
      if topology != "all":
        assert all(j != i for j, _ in shared)
      assert private_refs(items) == [(i, p) for p in range(r)]
      # Every shared output block is preceded by its header.
      for a, b in zip(items, items[1:], strict=False):
        if isinstance(b, OutputRef) and not b.private:
          assert isinstance(a, TextSegment) and a.name.startswith(f"header:agent{b.agent}")


# ---- Text banks (tokendance_jax/data/workload_*.json).


def bank_file_json(name: str) -> dict:
  return json.loads(workload_text.data_dir().joinpath(f"{name}.json").read_text(encoding="utf-8"))


@pytest.fixture
def fresh_banks():
  """Bank files are read once and cached; start and end the test with an empty cache."""
  workload_text.text_banks.cache_clear()
  yield
  workload_text.text_banks.cache_clear()


def test_every_bank_file_ships_and_holds_exactly_its_banks():
  shipped = {p.name for p in workload_text.data_dir().iterdir() if p.name.startswith("workload_")}
  assert shipped == {f"{name}.json" for name in workload_text.BANK_FILES}
  for name, keys in workload_text.BANK_FILES.items():
    assert sorted(bank_file_json(name)) == sorted(keys), name


@pytest.mark.parametrize("name", sorted(workload_text.BANK_FILES))
def test_every_bank_loads_non_empty_and_distinct(name):
  raw = bank_file_json(name)
  banks = workload_text.text_banks(name)
  for key, value in raw.items():
    entries = list(value.values()) + list(value) if isinstance(value, dict) else value
    assert entries and all(isinstance(v, str) and v.strip() for v in entries), (name, key)
    if isinstance(value, list):  # drawn without replacement, or "{x}"/"{x2}" pairs: distinct
      assert len(set(value)) == len(value), (name, key)
      assert banks[key] == tuple(value)
    else:
      assert list(banks[key].items()) == list(value.items())
  assert workload_text.text_banks(name) is banks  # read once


def test_banks_are_big_enough_for_their_draws():
  common = workload_text.text_banks("workload_common")
  assert len(common["trait"]) >= 3  # three distinct innate traits per resident
  assert len(common["first_name"]) * len(common["last_name"]) >= 100  # agent_society's 100
  assert len(workload_text.text_banks("workload_town")["places"]) >= 2  # "here" and "there"


def test_templates_name_only_known_slots():
  def fields(template):
    return {f.rstrip("0123456789") for _, f, _, _ in string.Formatter().parse(template) if f}
  derived = {"workload_town": {"place", "trait", "other", "first"},
             "workload_city": {"district", "amount", "pct", "trait", "other"}}
  slots = {"workload_town": set(workload_text.TOWN_SLOTS), "workload_city":
           set(workload_text.CITY_SLOTS)}
  templates = {"workload_town": ("memories", "events", "plans", "persona_facts"),
               "workload_city": ("incidents", "bulletins")}
  for name, keys in templates.items():
    banks = workload_text.text_banks(name)
    for key in keys:
      for template in banks[key]:
        unknown = fields(template) - slots[name] - derived[name]
        assert not unknown, (name, key, template, unknown)


def copy_bank_files(dest, skip=()):
  for name in workload_text.BANK_FILES:
    if name not in skip:
      (dest / f"{name}.json").write_text(json.dumps(bank_file_json(name)), encoding="utf-8")


@pytest.mark.parametrize("name,preset", [("workload_common", "debate"),
                                         ("workload_town", "generative_agents"),
                                         ("workload_city", "agent_society"),
                                         ("workload_debate", "debate")])
def test_a_missing_bank_file_is_named(name, preset, tmp_path, monkeypatch, fresh_banks):
  copy_bank_files(tmp_path, skip=(name,))
  monkeypatch.setattr(workload_text, "data_dir", lambda: tmp_path)
  with pytest.raises(FileNotFoundError, match=f"tokendance_jax/data/{name}.json is missing"):
    Workload(W.preset(preset, n_agents=3))


def corrupt_rename(data):
  data["rule"] = data.pop("rules")


def corrupt_repeat(data):
  data["rules"].append(data["rules"][0])


def corrupt_empty(data):
  data["rules"] = []


@pytest.mark.parametrize("corrupt,message", [
    (corrupt_rename, "lacks the bank\\(s\\) rules"),
    (corrupt_repeat, "bank 'rules' repeats"),
    (corrupt_empty, "bank 'rules' must be a non-empty"),
    (None, "repeats the key\\(s\\) rules"),
])
def test_a_malformed_bank_file_is_named(corrupt, message, tmp_path, monkeypatch, fresh_banks):
  copy_bank_files(tmp_path)
  path = tmp_path / "workload_debate.json"
  if corrupt is None:  # a key written twice, which json.loads alone would silently collapse
    path.write_text('{"rules": ["a"], "rules": ["b"]}', encoding="utf-8")
  else:
    data = bank_file_json("workload_debate")
    corrupt(data)
    path.write_text(json.dumps(data), encoding="utf-8")
  monkeypatch.setattr(workload_text, "data_dir", lambda: tmp_path)
  with pytest.raises(ValueError, match=f"tokendance_jax/data/workload_debate.json.*{message}"):
    Workload(W.preset("debate", n_agents=3))
  assert Workload(W.preset("generative_agents", n_agents=3)).system_text  # other files still load
