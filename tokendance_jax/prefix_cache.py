"""Automatic prefix caching, vLLM style: a hash chain over blocks, reused across requests.

Block j of a prompt is keyed by hash(key of block j-1, block tokens, block
length), so a cached block is reused only when everything before it is
identical too: the same block at another offset, or after another prefix,
misses. The cache holds one reference on each cached page; pages that only
the cache still references are evicted least recently used first when the
allocator runs short. On a sharded pool each shard has a chain of its own (a
block is served only to sequences on the shard holding its page).
"""

from __future__ import annotations

import collections
import hashlib

import numpy as np

from tokendance_jax.paging import PageAllocator


def chain_key(parent: str, tokens) -> str:
  h = hashlib.blake2b(parent.encode(), digest_size=16)
  h.update(np.asarray(tokens, np.int32).tobytes())
  return h.hexdigest()


def servable(blocks: list) -> list:
  """The blocks of a prompt (split into blocks, its last one included, full or not) that
  prefix caching may serve: all but the last, since the prompt's last token must be
  computed (its logits sample the first output)."""
  return blocks[:-1]


def _root(shard: int) -> str:
  return "" if shard == 0 else f"shard {shard}"


class PrefixCache:
  def __init__(self, allocator: PageAllocator):
    self.allocator = allocator
    self.entries: collections.OrderedDict[str, int] = collections.OrderedDict()
    self.hits = 0
    self.misses = 0
    allocator.add_reclaimer(self.evict)

  def _hit_chain(self, blocks: list[tuple[int, ...]], shard: int) -> list[tuple[str, int]]:
    """(key, page) of each block of the longest cached prefix of `blocks` on `shard`."""
    hits, parent = [], _root(shard)
    for tokens in blocks:
      parent = chain_key(parent, tokens)
      page = self.entries.get(parent)
      if page is None:
        break
      hits.append((parent, page))
    return hits

  def match(self, blocks: list[tuple[int, ...]], shard: int = 0) -> list[int]:
    """Pages of the longest cached prefix of `blocks` (token tuples) on `shard`; takes a
    reference on each."""
    hits = self._hit_chain(blocks, shard)
    for key, _ in hits:
      self.entries.move_to_end(key)
    pages = [page for _, page in hits]
    self.allocator.share(pages)
    self.hits += len(pages)
    self.misses += len(blocks) - len(pages)
    return pages

  def peek(self, blocks: list[tuple[int, ...]], shard: int = 0) -> list[int]:
    """Pages of the longest cached prefix of `blocks` on `shard`, without taking references,
    counting hits or touching the LRU order (for admission estimates)."""
    return [page for _, page in self._hit_chain(blocks, shard)]

  def insert(self, blocks: list[tuple[int, ...]], pages: list[int],
             parent: str | None = None) -> str | None:
    """Cache each (block tokens, page) along the chain of the pages' shard, after the block
    keyed `parent` (None: from the chain's root); the cache takes its own reference.
    Returns the last block's key (None when `blocks` is empty), to continue the chain."""
    if not pages:
      return parent
    if parent is None:
      parent = _root(self.allocator.shard_of(pages[0]))
    for tokens, page in zip(blocks, pages, strict=True):
      key = chain_key(parent, tokens)
      if key not in self.entries:
        self.allocator.share([page])
        self.entries[key] = page
      self.entries.move_to_end(key)
      parent = key
    return parent

  def evict(self, needed: int, shard: int | None = None) -> int:
    """Free up to `needed` pages (of `shard`, or any) that only the cache references, oldest
    first."""
    freed = 0
    for key in list(self.entries):
      if freed >= needed:
        break
      page = self.entries[key]
      if self.allocator.refcount(page) == 1 and shard in (None, self.allocator.shard_of(page)):
        del self.entries[key]
        freed += len(self.allocator.free([page]))
    return freed

  def clear(self) -> None:
    self.allocator.free(list(self.entries.values()))
    self.entries.clear()

  @property
  def num_pages(self) -> int:
    return len(self.entries)
