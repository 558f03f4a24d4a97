"""Host-side page bookkeeping: a reference-counted page allocator and block tables.

The device holds the page pool (`model.KVCache`); this module decides which
physical page holds which logical block. Page 0 is the null page: padding
entries of block tables point at it and it is never handed out.
"""

from __future__ import annotations

import bisect

import numpy as np

NULL_PAGE = 0


class OutOfPages(RuntimeError):
  """The pool cannot satisfy an allocation; nothing was allocated.

  The scheduler catches this to wait or preempt; it never leaves the pool
  half-updated. On a sharded pool `shard` names the shard that ran out.
  """

  def __init__(self, requested: int, free: int, detail: str = "", shard: int | None = None):
    where = f"shard {shard}: " if shard is not None else ""
    super().__init__(f"{where}requested {requested} pages, {free} free"
                     + (f": {detail}" if detail else ""))
    self.requested = requested
    self.free = free
    self.detail = detail
    self.shard = shard


class PageAllocator:
  """Reference-counted allocator over the pages of a pool, split into `shards` ranges.

  Shard s owns global pages [s * L, (s + 1) * L), L = num_pages // shards,
  and hands out all but the first of them: page s * L is that shard's null
  page (page 0, `NULL_PAGE`, for shard 0), which a device holding the shard
  sees as its local page 0. Page ids are global everywhere on the host; only
  `alloc` takes a shard, every other call finds a page's shard from its id.
  """

  def __init__(self, num_pages: int, shards: int = 1):
    if shards < 1 or num_pages % shards:
      raise ValueError(f"num_pages={num_pages} must split evenly into shards={shards}")
    if num_pages // shards < 2:
      raise ValueError(f"num_pages={num_pages} over {shards} shard(s) leaves "
                       f"{num_pages // shards} per shard; need at least 2 (one is reserved)")
    self.num_pages, self.shards = num_pages, shards
    self.pages_per_shard = num_pages // shards
    self._refcount = np.zeros(num_pages, np.int32)
    # One stack per shard: recently freed pages are reused first (warm in cache).
    self._free = [list(range((s + 1) * self.pages_per_shard - 1, s * self.pages_per_shard, -1))
                  for s in range(shards)]
    # Called in order with the pages still missing (and the shard) before OutOfPages is
    # raised; caches of evictable pages (the prefix cache, kept masters) free what they
    # can here (`add_reclaimer`).
    self._reclaimers: list = []

  @property
  def num_free(self) -> int:
    return sum(len(f) for f in self._free)

  def free_in(self, shard: int) -> int:
    """Free pages of one shard."""
    return len(self._free[self._check_shard(shard)])

  @property
  def num_used(self) -> int:
    return self.num_pages - self.shards - self.num_free

  def used_in(self, shard: int) -> int:
    return self.pages_per_shard - 1 - self.free_in(shard)

  def shard_of(self, page: int) -> int:
    return int(page) // self.pages_per_shard

  def refcount(self, page: int) -> int:
    return int(self._refcount[page])

  def add_reclaimer(self, fn) -> None:
    """Register `fn(missing_pages, shard) -> pages freed` (freeing pages of that shard),
    asked (after those added before it) when an allocation finds too few free pages."""
    self._reclaimers.append(fn)

  def alloc(self, n: int, shard: int = 0) -> list[int]:
    """n fresh pages of `shard` with refcount 1, or OutOfPages (all or nothing)."""
    if n < 0:
      raise ValueError(f"cannot allocate n={n} pages")
    free = self._free[self._check_shard(shard)]
    for reclaim in self._reclaimers:
      if n <= len(free):
        break
      reclaim(n - len(free), shard)
    if n > len(free):
      raise OutOfPages(n, len(free), shard=shard if self.shards > 1 else None)
    pages = [free.pop() for _ in range(n)]
    self._refcount[pages] = 1
    return pages

  def share(self, pages) -> None:
    """Add a reference to each (live) page."""
    pages = list(pages)
    self._check_live(pages)
    np.add.at(self._refcount, pages, 1)

  def free(self, pages) -> list[int]:
    """Drop one reference from each page; returns the pages that became free."""
    pages = list(pages)
    self._check_live(pages)
    counts = np.bincount(pages, minlength=self.num_pages)
    over = np.nonzero(counts > self._refcount)[0]
    if over.size:
      raise ValueError(f"double free: pages {over.tolist()} freed more often than referenced")
    self._refcount -= counts.astype(np.int32)
    released = [p for p in dict.fromkeys(pages) if self._refcount[p] == 0]
    for p in reversed(released):
      self._free[self.shard_of(p)].append(p)
    return released

  def _check_shard(self, shard: int) -> int:
    if not 0 <= shard < self.shards:
      raise ValueError(f"shard {shard} out of range 0..{self.shards - 1}")
    return shard

  def _check_live(self, pages) -> None:
    for p in pages:
      if not 0 <= p < self.num_pages or p % self.pages_per_shard == 0:
        reserved = " (a shard's reserved null page)" if 0 < p < self.num_pages else ""
        raise ValueError(f"page {p} out of range 1..{self.num_pages - 1}{reserved}")
      if self._refcount[p] == 0:
        raise ValueError(f"page {p} is not allocated")

  def state_dict(self) -> dict:
    """JSON-ready bookkeeping (refcounts of live pages, the free stacks) for snapshots."""
    live = np.nonzero(self._refcount)[0]
    free = self._free[0] if self.shards == 1 else [list(f) for f in self._free]
    return {"num_pages": self.num_pages, "shards": self.shards, "live": live.tolist(),
            "refcounts": self._refcount[live].tolist(), "free": list(free)}

  def load_state_dict(self, state: dict) -> None:
    """Restore `state_dict()` output; the page count must match and the state be consistent."""
    if (state["num_pages"], state.get("shards", 1)) != (self.num_pages, self.shards):
      raise ValueError(f"snapshot has {state['num_pages']} pages in {state.get('shards', 1)} "
                       f"shard(s), this pool {self.num_pages} in {self.shards}")
    refcount = np.zeros(self.num_pages, np.int32)
    refcount[np.asarray(state["live"], np.int64)] = state["refcounts"]
    free = [state["free"]] if self.shards == 1 else state["free"]
    old = (self._refcount, self._free)
    self._refcount, self._free = refcount, [[int(p) for p in f] for f in free]
    try:
      self.check_invariants()
    except AssertionError as e:
      self._refcount, self._free = old
      raise ValueError(f"inconsistent allocator snapshot: {e}") from None

  def check_invariants(self) -> None:
    """Free lists and refcounts agree (used by tests and after preemption)."""
    if len(self._free) != self.shards:
      raise AssertionError(f"{len(self._free)} free lists for {self.shards} shards")
    flat = [p for f in self._free for p in f]
    free = set(flat)
    if len(free) != len(flat):
      raise AssertionError("a page is on the free list twice")
    L = self.pages_per_shard
    nulls = set(range(0, self.num_pages, L))
    if free & nulls or self._refcount[sorted(nulls)].any():
      raise AssertionError("a null page was handed out")
    if any(self.shard_of(p) != s for s, f in enumerate(self._free) for p in f):
      raise AssertionError("a page is on another shard's free list")
    zero = {p for p in range(self.num_pages) if p not in nulls and self._refcount[p] == 0}
    if zero != free:
      raise AssertionError(f"free list {sorted(free)[:8]}... != zero-refcount pages")


def pages_needed(num_tokens: int, page_size: int) -> int:
  return -(-num_tokens // page_size)


class BlockTable:
  """One sequence's blocks in position order: physical page, first position, slots used.

  Block j serves positions starts[j] .. starts[j] + lens[j] - 1 from slots
  0.. of pages[j]. A segment laid out with `append_segment` starts on a fresh
  block (so a master page can be shared at any offset); `ensure` grows the
  open tail contiguously. On an empty table, `ensure` alone gives the plain
  layout block j = positions j * page_size ... The table holds one reference
  on every page it lists.
  """

  def __init__(self, page_size: int, shard: int = 0):
    self.page_size = page_size
    self.shard = shard  # the pool shard every page of the table comes from
    self.pages: list[int] = []
    self.starts: list[int] = []
    self.lens: list[int] = []
    self.end = 0  # one past the last position of the sealed segments

  def capacity(self) -> int:
    """Positions [0, capacity) have a slot."""
    return self.starts[-1] + self.lens[-1] if self.pages else 0

  def append_segment(self, pages: list[int], length: int) -> None:
    """Lay `length` positions from self.end on `pages` (references already held)."""
    if self.capacity() > self.end:
      raise ValueError("cannot append a segment after an open tail")
    if len(pages) != pages_needed(length, self.page_size):
      raise ValueError(f"{len(pages)} pages for a {length}-token segment of page size "
                       f"{self.page_size}")
    for j, page in enumerate(pages):
      self.pages.append(page)
      self.starts.append(self.end + j * self.page_size)
      self.lens.append(min(self.page_size, length - j * self.page_size))
    self.end += length

  def ensure(self, num_tokens: int, allocator: PageAllocator) -> list[int]:
    """Grow the open tail to hold num_tokens; returns new pages (OutOfPages: unchanged)."""
    start = max(self.capacity(), self.end)
    if self.pages and self.lens[-1] < self.page_size and self.capacity() > self.end:
      raise AssertionError("open tail blocks are always full-size")
    missing = pages_needed(max(num_tokens - start, 0), self.page_size)
    if missing <= 0:
      return []
    new = allocator.alloc(missing, self.shard)
    for j, page in enumerate(new):
      self.pages.append(page)
      self.starts.append(start + j * self.page_size)
      self.lens.append(self.page_size)
    return new

  def slot(self, pos: int) -> int:
    """Flat slot (page * page_size + offset) holding position pos."""
    j = bisect.bisect_right(self.starts, pos) - 1
    if j < 0 or pos >= self.starts[j] + self.lens[j]:
      raise IndexError(f"position {pos} has no slot in this block table")
    return self.pages[j] * self.page_size + pos - self.starts[j]

  def slots(self, start: int, stop: int) -> np.ndarray:
    return self.slots_at(np.arange(start, stop))

  def slots_at(self, positions) -> np.ndarray:
    """Vectorized `slot` for an array of positions -> [n] int32."""
    positions = np.asarray(positions, np.int64)
    starts = np.asarray(self.starts, np.int64)
    j = np.searchsorted(starts, positions, side="right") - 1
    lens = np.asarray(self.lens, np.int64)
    if positions.size and (j.min() < 0 or np.any(positions >= starts[j] + lens[j])):
      bad = positions[(j < 0) | (positions >= starts[np.maximum(j, 0)] + lens[np.maximum(j, 0)])]
      raise IndexError(f"positions {bad[:5].tolist()} have no slot in this block table")
    pages = np.asarray(self.pages, np.int64)
    return (pages[j] * self.page_size + positions - starts[j]).astype(np.int32)

  def replace_pages(self, first: int, pages: list[int], allocator: PageAllocator) -> None:
    """Point blocks first.. at `pages` (references already held), freeing the pages they
    listed: e.g. blocks found in a prefix cache after the table was laid out."""
    if not 0 <= first <= first + len(pages) <= len(self.pages):
      raise ValueError(f"blocks {first}..{first + len(pages) - 1} outside the table's "
                       f"{len(self.pages)} blocks")
    old = self.pages[first:first + len(pages)]
    self.pages[first:first + len(pages)] = list(pages)
    allocator.free(old)

  def truncate(self, num_blocks: int, allocator: PageAllocator) -> None:
    """Drop every block after the first `num_blocks` (freeing their pages)."""
    if not 0 <= num_blocks <= len(self.pages):
      raise ValueError(f"num_blocks={num_blocks} outside 0..{len(self.pages)}")
    allocator.free(self.pages[num_blocks:])
    del self.pages[num_blocks:], self.starts[num_blocks:], self.lens[num_blocks:]
    self.end = min(self.end, self.capacity())

  def release(self, allocator: PageAllocator) -> None:
    allocator.free(self.pages)
    self.pages, self.starts, self.lens, self.end = [], [], [], 0

  def rows(self, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pages, starts, lens), each [width] int32, padded with null entries (len 0)."""
    if len(self.pages) > width:
      raise ValueError(f"block table of {len(self.pages)} pages does not fit width {width}")
    out = np.zeros((3, width), np.int32)
    n = len(self.pages)
    out[0, :n], out[1, :n], out[2, :n] = self.pages, self.starts, self.lens
    out[1, n:] = np.iinfo(np.int32).max // 2  # null entries start after every query
    return out[0], out[1], out[2]

  def as_row(self, width: int) -> np.ndarray:
    """[width] int32 pages, padded with the null page."""
    return self.rows(width)[0]
