"""Which reused tokens to recompute, and which master blocks that forks: pure host functions.

No model and no engine here, so the planning is testable on hand-made
inputs (`tests/test_selection.py`). The device side of the selection (the
batched top-k over deviations) is `collector.select_tokens`; the stage that
runs the check and applies these plans is `collect`.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping

import numpy as np

from tokendance_jax.paging import BlockTable, pages_needed
from tokendance_jax.rounds import AgentPrompt, ReusePolicy, Segment, segment_key

__all__ = ["budget", "copy_on_write_plan", "epic_selection", "exact_head", "max_forked_blocks",
           "token_groups"]


def budget(num_shared: int, fraction: float) -> int:
  """Reused tokens an agent may recompute: `fraction` of its shared tokens, rounded."""
  return int(round(fraction * num_shared))


def epic_selection(seg_spans: list[tuple[int, int, Segment]], num_tokens: int,
                   k: int) -> np.ndarray:
  """EPIC's rule: the first `k` tokens of every shared segment. bool [num_tokens]."""
  sel = np.zeros(num_tokens, bool)
  for p0, _, seg in seg_spans:
    if seg.shared:
      sel[p0:p0 + min(k, len(seg))] = True
  return sel


def exact_head(seg_spans: list[tuple[int, int, Segment]], tokens, masters: Mapping) -> int:
  """Leading positions whose reused K/V equal what this prompt computes: the run of shared
  segments whose masters (`masters[key].context`) were computed after exactly the tokens
  that precede them here."""
  head = 0
  for p0, _, seg in seg_spans:
    m = masters.get(seg.key) if seg.shared else None
    if m is None or m.context is None or m.context != segment_key(tokens[:p0]):
      break
    head = p0 + len(seg)
  return head


def token_groups(sizes: list[int], max_tokens: int) -> list[list[int]]:
  """Agents grouped so each group's tokens fit one batch of `max_tokens` (an agent is never
  split; one larger than the batch gets a group of its own)."""
  groups, cur, size = [], [], 0
  for i, n in enumerate(sizes):
    if cur and size + n > max_tokens:
      groups.append(cur)
      cur, size = [], 0
    cur.append(i)
    size += n
  return groups + [cur]


def copy_on_write_plan(table: BlockTable, selected: np.ndarray,
                       shared_blocks: set[int]) -> list[tuple[int, bool]]:
  """(block, keep_rest) for every shared block the selection touches, in block order.

  The agent gets its own page for each such block; `keep_rest` is True when
  only part of the block is recomputed, so the master's page must be copied
  first (the untouched tokens keep the master's K/V).
  """
  touched = set((table.slots_at(np.flatnonzero(selected)) // table.page_size).tolist())  # pages
  plan = []
  for b in sorted(shared_blocks):
    if table.pages[b] not in touched:
      continue
    start, length = table.starts[b], table.lens[b]
    plan.append((b, not selected[start:start + length].all()))
  return plan


def max_forked_blocks(prompt: AgentPrompt, policy: ReusePolicy, page_size: int) -> int:
  """The most master blocks one agent's recompute can fork, for admission.

  A selected token forks every block of the table on its page, and a segment
  that occurs c times in the prompt (the same master) has c blocks on each of
  its pages. Token selection selects at most `budget` tokens. Block selection
  (`collector.select_tokens(by_block=True)`) ranks pages and takes them in some
  order until the budget is covered, so every page but the last it takes holds
  fewer tokens than the budget together: at most k blocks, where k is how many
  of the smallest blocks stay under the budget (a segment starts on a fresh
  page, so its last page may be short), and the last page forks at most c.
  """
  shared = [s for s in prompt.segments if s.shared]
  if policy.select == "epic":
    return sum(pages_needed(min(policy.epic_k, len(s)), page_size) for s in shared)
  sizes = sorted(min(page_size, len(s) - j) for s in shared for j in range(0, len(s), page_size))
  n = budget(sum(sizes), policy.recompute)
  if n == 0:
    return 0
  copies = max(collections.Counter(s.key for s in shared).values())
  if policy.select != "block":
    return min(len(sizes), n * copies)
  below = int(np.searchsorted(np.cumsum(sizes), n, side="left"))  # smallest blocks summing < n
  return min(len(sizes), below + copies)
