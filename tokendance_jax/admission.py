"""Admission of a round's agents in waves, as the page pool allows.

A round whose agents do not all fit the pool at once is not refused: its
agents are admitted in waves, in prompt order, each wave as many agents as
the pages free after the round's masters hold. Each wave lays out, runs the
collective step, decodes and hands over before the next one starts, and
every wave reads the same masters. Only an agent that cannot fit alone
raises `OutOfPages`.

`place_waves` is the pure part; the session estimates each agent's pages (an
upper bound: its fresh prompt pages, the most copy-on-write pages its
recompute budget can touch, and its output pages). On a pool sharded over
devices it also places each agent on a shard: the one with the most room
left once the agent is there, so the shards' pages balance; an agent costs
less where its prefix-cache hit lives or where the masters it reads already
have a replica (a new replica is charged once per shard).
"""

from __future__ import annotations

from tokendance_jax.paging import OutOfPages


def plan_waves(needs: list[int], available: int, names: list[str] | None = None) -> list[list[int]]:
  """Split agents 0..n-1 (in order) into waves whose summed `needs` fit `available` pages
  (`place_waves` on one shard).

  Raises OutOfPages naming the first agent that needs more than `available` alone.
  """
  return [[i for i, _ in w] for w in place_waves([needs], [available], names)]


def place_waves(needs: list[list[int]], available: list[int], names: list[str] | None = None,
                reads: list[dict[str, int]] | None = None,
                present: list[set[str]] | None = None,
                pins: list[list[set[int]]] | None = None) -> list[list[tuple[int, int]]]:
  """Agents 0..n-1 (in order) in waves of (agent, shard), each shard's summed needs in a
  wave within its `available` pages.

  needs[d][i]: pages agent i needs on shard d; available[d]: shard d's pages.
  reads[i]: {master key: pages} agent i reads; present[d]: the masters with a replica
  on shard d. An agent placed on a shard without a replica of a master it reads pays the
  replica's pages once for that shard; replicas outlive the wave.
  pins[d][i]: the reclaimable cached pages on shard d that agent i's layout would reuse
  there (counted in `available`). A wave cannot reclaim a page one of its agents holds, so
  each wave pays for the pins of its agents once per page, and the next wave pays again.
  Raises OutOfPages naming the first agent that fits no shard alone.
  """
  if len(needs) != len(available):
    raise ValueError(f"needs for {len(needs)} shards, pages for {len(available)}")
  n = len(needs[0]) if needs else 0
  names = names or [str(i) for i in range(n)]
  reads = reads or [{} for _ in range(n)]
  have = [set(p) for p in present] if present else [set() for _ in available]
  shards = range(len(available))
  pins = pins or [[set()] * n for _ in available]
  fixed = [0] * len(available)  # replica pages made this round, held across its waves

  def replica(i: int, d: int) -> int:
    return sum(v for k, v in reads[i].items() if k not in have[d])

  def cost(i: int, d: int, pinned: set[int] = frozenset()) -> int:
    return needs[d][i] + replica(i, d) + len(pins[d][i] - pinned)

  waves: list[list[tuple[int, int]]] = []
  cur, used, held = [], [0] * len(available), [set() for _ in available]
  for i in range(n):
    if all(fixed[d] + cost(i, d) > available[d] for d in shards):
      d = max(shards, key=lambda d: available[d] - fixed[d] - cost(i, d))
      where = f" on any of the {len(available)} pool shards (shard {d} has the most room)" \
          if len(available) > 1 else ""
      raise OutOfPages(cost(i, d), available[d] - fixed[d],
                       f"agent {names[i]!r} alone needs up to {cost(i, d)} pages and "
                       f"{available[d] - fixed[d]} are free{where} after the round's masters "
                       "and cached pages; a bigger pool (--num-pages) or a shorter prompt is "
                       "needed", shard=d if len(available) > 1 else None)
    fits = [d for d in shards if fixed[d] + used[d] + cost(i, d, held[d]) <= available[d]]
    if not fits:
      waves.append(cur)
      cur, used, held = [], [0] * len(available), [set() for _ in available]
      fits = [d for d in shards if fixed[d] + cost(i, d) <= available[d]]
    # the most room left after placing it (pages balance; a shard that needs no replica,
    # holds a prefix hit or a page the wave already pins costs less, so leaves more), then
    # the lower cost, then the fewer fresh pages (a cache hit saves compute)
    d = min(fits, key=lambda d: (fixed[d] + used[d] + cost(i, d, held[d]) - available[d],
                                 cost(i, d, held[d]), needs[d][i], d))
    cur.append((i, d))
    used[d] += needs[d][i] + len(pins[d][i] - held[d])
    held[d] |= pins[d][i]
    fixed[d] += replica(i, d)
    have[d].update(reads[i])
  return waves + [cur] if cur else waves
