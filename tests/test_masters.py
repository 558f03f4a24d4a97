"""Master-construction planning: the consensus order of shared segments and the context plan."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokendance_jax.masters import common_prefix, consensus_order, context_plan
from tokendance_jax.rounds import AgentPrompt, Round, Segment


def is_subsequence(small, big) -> bool:
  it = iter(big)
  return all(x in it for x in small)


def test_one_order_is_kept():
  assert consensus_order([list("sabcd")] * 3) == list("sabcd")


def test_all_but_self_gives_the_canonical_order():
  keys = list("abcdef")
  prompts = [["s", *[k for k in keys if k != own]] for own in keys]
  assert consensus_order(prompts) == ["s", *keys]


def test_majority_wins_when_prompts_disagree():
  assert consensus_order([list("abc"), list("abc"), list("cba")]) == list("abc")
  assert consensus_order([list("cba"), list("cba"), list("abc")]) == list("cba")


def test_a_majority_cycle_is_broken_by_mean_position():
  # a<b, b<c, c<a each by 2 of 3 prompts; mean positions a: 1, b: 1, c: 1 -> first seen wins,
  # then the cycle continues in majority order from there.
  prompts = [list("abc"), list("bca"), list("cab")]
  order = consensus_order(prompts)
  assert sorted(order) == list("abc") and order[0] == "a" and order == list("abc")


def test_repeated_keys_in_a_prompt_count_once():
  assert consensus_order([list("abab"), list("ab")]) == list("ab")


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 12), st.integers(1, 8), st.integers(0, 2**31 - 1))
def test_prompts_that_are_subsequences_of_one_order_stay_subsequences(n_keys, n_prompts, seed):
  """k-random topologies: each prompt holds a subset of one global order; every prompt's order
  must survive in the consensus (an inverted comparison or a wrong tie-break breaks it)."""
  rng = np.random.default_rng(seed)
  total = [f"k{i}" for i in rng.permutation(n_keys)]
  prompts = []
  for _ in range(n_prompts):
    keep = rng.random(n_keys) < 0.6
    prompts.append([k for k, m in zip(total, keep, strict=True) if m])
  order = consensus_order(prompts)
  assert sorted(order) == sorted({k for p in prompts for k in p})
  for p in prompts:
    assert is_subsequence(p, order)


# -- context_plan -------------------------------------------------------------------------------


def seg(name, n, shared=True):
  """A segment whose tokens depend on its name only (so equal names are equal segments)."""
  base = sum(ord(c) * 31**i for i, c in enumerate(name)) % 40000
  return Segment(tuple(base + 3 + i for i in range(n)), shared, name)


SYS, ENV = seg("system", 10), seg("env", 6)
OUT = {j: seg(f"out{j}", 5) for j in range(4)}
HDR = {j: seg(f"hdr{j}", 2) for j in range(4)}


def round_of(orders):
  prompts = []
  for i, order in enumerate(orders):
    segs = [SYS, ENV, seg(f"persona{i}", 3, False)]
    for j in order:
      segs += [HDR[j], OUT[j]]
    segs.append(seg(f"tail{i}", 2, False))
    prompts.append(AgentPrompt(f"a{i}", segs))
  return Round(prompts)


def names(plan):
  return [[(s.name, c) for s, c in zip(p.segments, p.compute, strict=True)] for p in plan]


def test_common_prefix_is_what_every_prompt_starts_with():
  assert [s.name for s in common_prefix(round_of([[0, 1], [1, 0]]))] == ["system", "env"]
  rnd = Round([AgentPrompt("a", [SYS, seg("p", 2, False)]), AgentPrompt("b", [ENV, SYS,
                                                                             seg("q", 2, False)])])
  assert common_prefix(rnd) == []


def test_one_sequence_reads_existing_masters_and_computes_the_rest():
  rnd = round_of([[0, 1, 2]] * 3)
  have = {SYS.key, HDR[0].key, HDR[1].key, HDR[2].key}
  plan = context_plan(rnd, have.__contains__, max_len=1000)
  assert names(plan) == [[("system", False), ("env", True), ("hdr0", False), ("out0", True),
                          ("hdr1", False), ("out1", True), ("hdr2", False), ("out2", True)]]


def test_read_only_segments_after_the_last_new_one_are_dropped():
  rnd = round_of([[0, 1]] * 2)
  have = {SYS.key, ENV.key, HDR[0].key, HDR[1].key, OUT[1].key}
  plan = context_plan(rnd, have.__contains__, max_len=1000)
  assert names(plan) == [[("system", False), ("env", False), ("hdr0", False), ("out0", True)]]
  assert context_plan(rnd, lambda k: True, max_len=1000) == []


def test_a_mastered_segment_only_one_prompt_holds_is_no_context_for_the_others():
  """Agent i's own persona, read exactly from a master made in an earlier round, is shared
  in agent i's prompt only. The answers' masters, read by every agent, must not be
  computed after it (on the client benchmark, all 16 personas before the answers turned
  15 of 16 agents' first tokens)."""
  persona = {i: seg(f"own{i}", 3) for i in range(3)}
  rnd = Round([AgentPrompt(f"a{i}", [SYS, persona[i], HDR[0], OUT[0], seg(f"t{i}", 2, False)])
               for i in range(3)])
  have = {SYS.key, persona[0].key, persona[1].key}
  plan = context_plan(rnd, have.__contains__, max_len=1000)
  # own2 has no master and is computed where it was before: one prompt alone holds it
  assert names(plan) == [[("system", False), ("own2", True), ("hdr0", True), ("out0", True)]]
  have.add(persona[2].key)
  assert names(context_plan(rnd, have.__contains__, max_len=1000)) == [
      [("system", False), ("hdr0", True), ("out0", True)]]
  alone = Round(rnd.prompts[:1])  # one prompt: all of its segments are its context
  assert names(context_plan(alone, have.__contains__, max_len=1000)) == [
      [("system", False), ("own0", False), ("hdr0", True), ("out0", True)]]


def test_disagreeing_orders_follow_the_majority():
  rnd = round_of([[0, 1, 2], [0, 1, 2], [2, 1, 0]])
  plan = context_plan(rnd, lambda k: False, max_len=1000)
  assert [s.name for s in plan[0].segments] == ["system", "env", "hdr0", "out0", "hdr1", "out1",
                                                "hdr2", "out2"]


def test_long_sequences_are_cut_into_windows_that_restart_after_the_common_prefix():
  rnd = round_of([[0, 1, 2, 3]] * 2)  # 16 + 4 x 7 = 44 tokens
  plan = context_plan(rnd, lambda k: False, max_len=31)
  assert all(p.num_tokens <= 31 for p in plan)
  assert names(plan)[0][:2] == [("system", True), ("env", True)]
  for p in plan[1:]:
    assert [(s.name, c) for s, c in zip(p.segments[:2], p.compute[:2], strict=True)] == [
        ("system", False), ("env", False)]
  computed = [s.name for p in plan for s, c in zip(p.segments, p.compute, strict=True) if c]
  assert sorted(computed) == sorted(["system", "env"] + [f"{k}{j}" for j in range(4)
                                                         for k in ("hdr", "out")])
  with pytest.raises(ValueError, match="does not fit the model context"):
    context_plan(rnd, lambda k: False, max_len=20)
