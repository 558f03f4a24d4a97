"""Implicit rounds on the engine's pool: chunk-level reuse for unmarked prompts (tiny model)."""

import jax
import numpy as np
import pytest

from tokendance_jax import model
from tokendance_jax.chunking import ChunkConfig
from tokendance_jax.config import TINY, CacheConfig
from tokendance_jax.engine import Engine
from tokendance_jax.implicit import (
  ImplicitRounds,
  Request,
  message_cuts,
  message_openers,
  no_masters,
  segments,
)
from tokendance_jax.rounds import ReusePolicy, Segment, segment_key
from tokendance_jax.sampling import SamplingParams
from tokendance_jax.serve.testing import ByteTokenizer

CHUNKS = ChunkConfig(avg=16, min_len=8, max_len=64, window=4)
SP = SamplingParams(max_tokens=5, ignore_eos=True)
CC = CacheConfig(num_pages=128, page_size=8)


@pytest.fixture(scope="module")
def params():
  return model.init_params(TINY, jax.random.PRNGKey(0))


def _ids(seed, n):
  return [int(t) for t in np.random.default_rng(seed).integers(3, TINY.vocab_size, size=n)]


SYSTEM, OUTS = _ids(1, 48), [_ids(10 + i, 40) for i in range(3)]


def _prompt(i):
  """Agent i: the system prompt, the other agents' outputs, its own question."""
  others = [t for j, o in enumerate(OUTS) if j != i for t in o]
  return SYSTEM + others + _ids(20 + i, 12)


def _decode(eng, admitted):
  while eng.has_unfinished():
    eng.step()
  return {a.index: eng.pop_finished(a.seq.seq_id).output_ids for a in admitted}


def _full(params, prompts):
  return [Engine(params, TINY, cache_cfg=CC).generate([p], SP)[0].output_ids for p in prompts]


def test_segments_share_chunks_seen_twice_and_keep_the_last_private():
  reqs = [Request(_prompt(i), SP) for i in range(3)]
  segs = segments(reqs, no_masters, CHUNKS)
  for r, s in zip(reqs, segs, strict=True):
    assert [t for seg in s for t in seg.tokens] == r.ids
    assert not s[-1].shared
  shared = {seg.key for s in segs for seg in s if seg.shared}
  keys = [{seg.key for seg in s} for s in segs]
  assert shared and all(sum(k in ks for ks in keys) >= 2 for k in shared)
  alone = segments(reqs[:1], no_masters, CHUNKS)[0]
  assert not any(s.shared for s in alone)  # nothing seen twice, no master
  marked = [Segment(tuple(SYSTEM), shared=True), Segment((5, 6, 7))]
  assert segments([Request([], SP, segments=marked)], no_masters, CHUNKS) == [marked]


def test_the_last_tokens_before_the_generation_stay_private():
  reqs = [Request(_prompt(i), SP) for i in range(3)]

  def shared_ends(tail):
    out = []
    for r, segs in zip(reqs, segments(reqs, no_masters, CHUNKS, tail), strict=True):
      pos = 0
      for s in segs:
        pos += len(s)
        if s.shared:
          out.append(len(r.ids) - pos)  # tokens after the shared chunk
    return out

  assert min(shared_ends(0)) < 110  # without a tail, shared chunks reach near the end
  assert all(e >= 110 for e in shared_ends(110))


def test_a_message_is_shared_whole_markers_included():
  """Group-chat style: each agent's chat holds the other agents' answers as messages of
  their own, at a different offset in every chat. Cut where each message begins, every
  such message, its template markers included, lies in shared chunks: no private sliver
  (a page of its own in every agent) is left between two shared messages."""
  tok = ByteTokenizer()
  assert message_openers(tok) == {1}  # <|im_start|>
  answers = [f"agent {j} thinks the answer is {j * 37 % 11} because " + "x" * (30 + 7 * j)
             for j in range(4)]

  def chat(i):
    return [{"role": "system", "content": "Debate the question in rounds."},
            {"role": "user", "content": f"You are agent {i}."},
            *({"role": "user", "content": a} for j, a in enumerate(answers) if j != i),
            {"role": "user", "content": "Update your answer."}]

  ids = [tok.encode_parts(tok.chat_parts(chat(i))) for i in range(4)]
  reqs = [Request(x, SP, cuts=message_cuts(x, message_openers(tok))) for x in ids]
  for r, segs in zip(reqs, segments(reqs, no_masters, CHUNKS), strict=True):
    starts = [t for t, x in enumerate(r.ids) if x == 1] + [len(r.ids)]  # each message's
    owner = [k for k, (a, b) in enumerate(zip(starts, starts[1:], strict=False))
             for _ in range(a, b)]
    pos, private = 0, set()
    for s in segs:
      if not s.shared:
        private |= {owner[t] for t in range(pos, pos + len(s))}
      pos += len(s)
    # messages 0..1 are the agent's own (system, persona); 2..4 the others' answers
    assert not private & {2, 3, 4}, private


def test_recompute_everything_equals_full_prefill(params):
  prompts = [_prompt(i) for i in range(3)]
  eng = Engine(params, TINY, cache_cfg=CC)
  ir = ImplicitRounds(eng, ReusePolicy(recompute=1.0), CHUNKS)
  admitted = ir.prefill([Request(p, SP) for p in prompts])
  assert sorted(a.index for a in admitted) == [0, 1, 2]
  assert sum(a.chunk_hit_tokens for a in admitted) == 0  # nothing existed before the step
  got = _decode(eng, admitted)
  assert [got[i] for i in range(3)] == _full(params, prompts)
  for a in admitted:
    ir.release(a.agent)
  assert eng.allocator.num_used == ir.masters.num_pages
  ir.masters.clear()
  assert eng.allocator.num_used == 0
  eng.allocator.check_invariants()


def test_a_later_request_reads_masters_and_computes_less(params):
  eng = Engine(params, TINY, cache_cfg=CC)
  ir = ImplicitRounds(eng, ReusePolicy(recompute=0.1), CHUNKS, private_tail=0)
  first = ir.prefill([Request(_prompt(0), SP)])  # alone: every chunk private, then a master
  assert first[0].computed_tokens == len(_prompt(0))
  _decode(eng, first)
  ir.release(first[0].agent)
  assert len(ir.masters.masters) >= 3
  later = ir.prefill([Request(_prompt(0)[:-12] + _ids(99, 12), SP)])
  a = later[0]
  assert a.chunk_hit_tokens > len(SYSTEM)
  assert a.computed_tokens < 0.5 * a.agent.num_prompt
  _decode(eng, later)
  ir.release(a.agent)
  assert eng.allocator.num_used == ir.masters.num_pages


def test_a_shared_head_chunk_makes_the_system_prompt_exact(params):
  """Chats start with the template's first marker, a 1-token chunk of its own (a control
  cut). Shared as the prompt's head, its master is exact, and so are the system prompt's
  masters made after it: every agent's exact head runs to the last shared chunk inside
  the common prefix, none of it is recomputed even at recompute 1.0, and the outputs
  equal a full prefill."""
  prompts = [[2] + _prompt(i) for i in range(3)]
  reqs = [Request(p, SP, cuts=(0, 1)) for p in prompts]
  segs = segments(reqs, no_masters, CHUNKS)
  common = 1 + len(SYSTEM)
  heads = []
  for s in segs:
    assert s[0].shared and len(s[0]) == 1
    pos = 0
    for seg in s:
      if not seg.shared or pos + len(seg) > common:
        break
      pos += len(seg)
    heads.append(pos)
  assert min(heads) > 1  # the head and at least one system chunk
  eng = Engine(params, TINY, cache_cfg=CC)
  ir = ImplicitRounds(eng, ReusePolicy(recompute=1.0), CHUNKS, private_tail=0)
  adm = ir.prefill(reqs)
  for a in adm:
    assert a.agent.exact_head == heads[a.index]
    assert a.agent.recompute.min() == heads[a.index]  # everything after it, nothing in it
  got = _decode(eng, adm)
  assert [got[i] for i in range(3)] == _full(params, prompts)
  for a in adm:
    ir.release(a.agent)
  assert eng.allocator.num_used == ir.masters.num_pages


def test_a_requests_own_chunk_serves_only_prompts_with_the_same_tokens_before_it(params):
  """A request alone computes every chunk after its own tokens; those chunks become masters.
  A later prompt holding the same chunks after other tokens (another agent's persona) must
  not read them, since their K/V carries the first request's context: it computes them
  and equals a full prefill. A prompt holding the same tokens before them reads them."""
  body = _ids(50, 96)
  first, other = _ids(51, 20) + body + _ids(52, 8), _ids(53, 20) + body + _ids(54, 8)
  eng = Engine(params, TINY, cache_cfg=CC)
  ir = ImplicitRounds(eng, ReusePolicy(recompute=0.1), CHUNKS, private_tail=0)
  ran = []
  for prompt in (first, other, first[:-8] + _ids(55, 8)):
    adm = ir.prefill([Request(prompt, SP)])
    ran.append((adm[0], _decode(eng, adm)[0]))
    ir.release(adm[0].agent)
  (_, _), (b, b_out), (c, _) = ran
  assert {m.source for m in ir.masters.masters.values()} == {"request"}
  assert b.chunk_hit_tokens == 0 and b.computed_tokens == len(other)
  assert b_out == _full(params, [other])[0]
  assert c.chunk_hit_tokens >= 80 and c.agent.exact_head == c.chunk_hit_tokens  # all exact


def test_a_private_chunk_master_records_its_exact_context(params):
  eng = Engine(params, TINY, cache_cfg=CC)
  ir = ImplicitRounds(eng, ReusePolicy(), CHUNKS)
  p = _prompt(1)
  adm = ir.prefill([Request(p, SP)])
  _decode(eng, adm)
  ir.release(adm[0].agent)
  first_seg = adm[0].agent.seg_spans[0][2]
  assert ir.masters.get(first_seg.key).context == segment_key(())  # at 0, fully computed


def test_prompts_that_do_not_fit_wait_and_nothing_leaks(params):
  eng = Engine(params, TINY, cache_cfg=CacheConfig(num_pages=40, page_size=8))
  ir = ImplicitRounds(eng, ReusePolicy(), CHUNKS)
  reqs = [Request(_prompt(i), SP) for i in range(3)]
  admitted = ir.prefill(reqs)
  assert 0 < len(admitted) < 3
  _decode(eng, admitted)
  for a in admitted:
    ir.release(a.agent)
  rest = ir.prefill([reqs[i] for i in range(3) if i not in {a.index for a in admitted}])
  assert rest
  _decode(eng, rest)
  for a in rest:
    ir.release(a.agent)
  assert eng.allocator.num_used == ir.masters.num_pages
  eng.allocator.check_invariants()
