"""Host-side page bookkeeping: a reference-counted page allocator and block tables.

The device holds the page pool (`model.KVCache`); this module decides which
physical page holds which logical block. Page 0 is the null page: padding
entries of block tables point at it and it is never handed out.
"""

from __future__ import annotations

import numpy as np

NULL_PAGE = 0


class OutOfPages(RuntimeError):
  """The pool cannot satisfy an allocation; nothing was allocated.

  The scheduler catches this to wait or preempt; it never leaves the pool
  half-updated.
  """

  def __init__(self, requested: int, free: int):
    super().__init__(f"requested {requested} pages, {free} free")
    self.requested = requested
    self.free = free


class PageAllocator:
  """Reference-counted allocator over pages 1..num_pages-1."""

  def __init__(self, num_pages: int):
    if num_pages < 2:
      raise ValueError(f"num_pages={num_pages}; need at least 2 (page 0 is reserved)")
    self.num_pages = num_pages
    self._refcount = np.zeros(num_pages, np.int32)
    # A stack: recently freed pages are reused first (warm in cache).
    self._free = list(range(num_pages - 1, 0, -1))

  @property
  def num_free(self) -> int:
    return len(self._free)

  @property
  def num_used(self) -> int:
    return self.num_pages - 1 - len(self._free)

  def refcount(self, page: int) -> int:
    return int(self._refcount[page])

  def alloc(self, n: int) -> list[int]:
    """n fresh pages with refcount 1, or OutOfPages (all or nothing)."""
    if n < 0:
      raise ValueError(f"cannot allocate n={n} pages")
    if n > len(self._free):
      raise OutOfPages(n, len(self._free))
    pages = [self._free.pop() for _ in range(n)]
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
    self._free.extend(reversed(released))
    return released

  def _check_live(self, pages) -> None:
    for p in pages:
      if not 0 < p < self.num_pages:
        raise ValueError(f"page {p} out of range 1..{self.num_pages - 1}")
      if self._refcount[p] == 0:
        raise ValueError(f"page {p} is not allocated")

  def check_invariants(self) -> None:
    """Free list and refcounts agree (used by tests and after preemption)."""
    free = set(self._free)
    if len(free) != len(self._free):
      raise AssertionError("a page is on the free list twice")
    if NULL_PAGE in free or self._refcount[NULL_PAGE]:
      raise AssertionError("the null page was handed out")
    zero = {p for p in range(1, self.num_pages) if self._refcount[p] == 0}
    if zero != free:
      raise AssertionError(f"free list {sorted(free)[:8]}... != zero-refcount pages")


def pages_needed(num_tokens: int, page_size: int) -> int:
  return -(-num_tokens // page_size)


class BlockTable:
  """One sequence's logical-block -> physical-page map."""

  def __init__(self, page_size: int):
    self.page_size = page_size
    self.pages: list[int] = []

  def capacity(self) -> int:
    return len(self.pages) * self.page_size

  def ensure(self, num_tokens: int, allocator: PageAllocator) -> list[int]:
    """Grow to hold num_tokens; returns the new pages (OutOfPages leaves it unchanged)."""
    missing = pages_needed(num_tokens, self.page_size) - len(self.pages)
    if missing <= 0:
      return []
    new = allocator.alloc(missing)
    self.pages.extend(new)
    return new

  def release(self, allocator: PageAllocator) -> None:
    allocator.free(self.pages)
    self.pages = []

  def as_row(self, width: int) -> np.ndarray:
    """[width] int32, padded with the null page."""
    if len(self.pages) > width:
      raise ValueError(f"block table of {len(self.pages)} pages does not fit width {width}")
    row = np.full(width, NULL_PAGE, np.int32)
    row[: len(self.pages)] = self.pages
    return row
