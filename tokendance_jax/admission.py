"""Admission of a round's agents in waves, as the page pool allows.

A round whose agents do not all fit the pool at once is not refused: its
agents are admitted in waves, in prompt order, each wave as many agents as
the pages free after the round's masters hold. Each wave lays out, runs the
collective step, decodes and hands over before the next one starts, and
every wave reads the same masters. Only an agent that cannot fit alone
raises `OutOfPages`.

`plan_waves` is the pure part; the session estimates each agent's pages (an
upper bound: its fresh prompt pages, the most copy-on-write pages its
recompute budget can touch, and its output pages).
"""

from __future__ import annotations

from tokendance_jax.paging import OutOfPages


def plan_waves(needs: list[int], available: int, names: list[str] | None = None) -> list[list[int]]:
  """Split agents 0..n-1 (in order) into waves whose summed `needs` fit `available` pages.

  Raises OutOfPages naming the first agent that needs more than `available` alone.
  """
  names = names or [str(i) for i in range(len(needs))]
  waves: list[list[int]] = []
  cur, used = [], 0
  for i, need in enumerate(needs):
    if need > available:
      raise OutOfPages(need, available,
                       f"agent {names[i]!r} alone needs up to {need} pages and {available} are "
                       "free after the round's masters and cached pages; a bigger pool "
                       "(--num-pages) or a shorter prompt is needed")
    if cur and used + need > available:
      waves.append(cur)
      cur, used = [], 0
    cur.append(i)
    used += need
  return waves + [cur] if cur else waves
