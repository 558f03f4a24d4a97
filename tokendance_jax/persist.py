"""Snapshots of round sessions with orbax: live KV pages, page bookkeeping, masters, histories.

`capture(session)` turns a `RoundSession` between rounds into (arrays, meta):
the K/V of every live page (gathered, so a snapshot is as large as what the
session holds, not its whole pool) and JSON bookkeeping (allocator refcounts
and free stack, masters, prefix-cache chain, known shared segments, round
index, checksums). `restore(session, arrays, meta)` puts both back into a
fresh session built with the same model, method, policy and pool, page for
page, so block tables and every later greedy output are unchanged.

`SnapshotStore` keeps numbered snapshots of many sessions under one
directory with an orbax `CheckpointManager`. Orbax writes each step into a
temporary directory and renames it only once complete, so a snapshot cut off
by `kill -9` never becomes the latest step: the previous one stays loadable.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from tokendance_jax import model
from tokendance_jax.diffstore import Master

FORMAT = 2  # 2: ReusePolicy.masters and tau replace anchor and output_masters


def _checksum(*arrays) -> str:
  h = hashlib.blake2b(digest_size=16)
  for a in arrays:
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


def capture(rs) -> tuple[dict | None, dict]:
  """(arrays, meta) of a `RoundSession` between rounds; arrays is None when no page is live."""
  alloc = rs.allocator.state_dict()
  live = np.asarray(alloc["live"], np.int32)
  cache = rs.engine.cache
  k = np.asarray(cache.k[:, :, live])
  v = np.asarray(cache.v[:, :, live])
  meta = {
      "format": FORMAT,
      "method": rs.method,
      "policy": dataclasses.asdict(rs.policy),
      "pool": {"num_pages": rs.cache_cfg.num_pages, "page_size": rs.cache_cfg.page_size,
               "dtype": str(jnp.dtype(rs.cache_cfg.dtype))},
      "kv_shape": list(cache.k.shape),
      "allocator": alloc,
      "masters": [{"key": m.key, "tokens": list(m.tokens), "replicas": list(m.replicas.items()),
                   "source": m.source,
                   "context": m.context}
                  for m in rs.masters.masters.values()],
      "prefix": None if rs.prefix is None else {
          "entries": list(rs.prefix.entries.items()), "hits": rs.prefix.hits,
          "misses": rs.prefix.misses},
      "known": {key: list(toks) for key, toks in rs.known.items()},
      "round_index": rs.round_index,
      "checksum": _checksum(k, v),
  }
  return ({"k": k, "v": v} if live.size else None), meta


def check_compatible(rs, meta: dict) -> None:
  """ValueError naming the first field where `rs` differs from the snapshot's session."""
  if meta.get("format") != FORMAT:
    raise ValueError(f"snapshot format {meta.get('format')!r}; this version reads {FORMAT}")
  want = {"method": rs.method, "policy": dataclasses.asdict(rs.policy),
          "kv_shape": list(rs.engine.cache.k.shape),
          "pool": {"num_pages": rs.cache_cfg.num_pages, "page_size": rs.cache_cfg.page_size,
                   "dtype": str(jnp.dtype(rs.cache_cfg.dtype))}}
  for key, value in want.items():
    if meta[key] != value:
      raise ValueError(f"snapshot {key}={meta[key]!r} but this session has {value!r}")


def restore(rs, arrays: dict | None, meta: dict) -> None:
  """Load a `capture` result into `rs`, a fresh session of the same configuration."""
  check_compatible(rs, meta)
  if arrays is None:  # a session without live pages is saved without arrays
    shape = meta["kv_shape"]
    k = v = np.zeros((*shape[:2], 0, *shape[3:]), meta["pool"]["dtype"])
  else:
    k, v = np.asarray(arrays["k"]), np.asarray(arrays["v"])
  if _checksum(k, v) != meta["checksum"]:
    raise ValueError("snapshot K/V do not match their checksum (corrupt or mixed snapshot)")
  if rs.allocator.num_used or rs.masters.masters or rs.round_index:
    raise ValueError("restore needs a fresh session (this one already holds pages or rounds)")
  live = np.asarray(meta["allocator"]["live"], np.int32)
  if k.shape[2] != live.size:
    raise ValueError(f"snapshot holds {k.shape[2]} pages but its allocator lists {live.size}")
  rs.allocator.load_state_dict(meta["allocator"])
  cache = rs.engine.cache
  if live.size:
    idx = jnp.asarray(live)
    cache = model.KVCache(k=cache.k.at[:, :, idx].set(jnp.asarray(k, cache.k.dtype)),
                          v=cache.v.at[:, :, idx].set(jnp.asarray(v, cache.v.dtype)))
  rs.engine.cache = jax.block_until_ready(cache)
  for m in meta["masters"]:
    replicas = m["replicas"] if "replicas" in m else [(0, m["pages"])]  # before sharded pools
    rs.masters.masters[m["key"]] = Master(m["key"], tuple(m["tokens"]),
                                          {int(d): list(r) for d, r in replicas}, m["source"],
                                          m.get("context"))
  if meta["prefix"] is not None:
    if rs.prefix is None:
      raise ValueError("snapshot has a prefix cache but this session's method has none")
    rs.prefix.entries.clear()
    rs.prefix.entries.update((key, int(page)) for key, page in meta["prefix"]["entries"])
    rs.prefix.hits, rs.prefix.misses = meta["prefix"]["hits"], meta["prefix"]["misses"]
  rs.known = {key: tuple(toks) for key, toks in meta["known"].items()}
  rs.round_index = meta["round_index"]


class SnapshotStore:
  """Numbered orbax snapshots under `directory`: item "kv" (arrays) and item "meta" (JSON).

  `save(arrays, meta)` writes the next step synchronously and keeps the
  newest `keep` (entries of `arrays` that are None are left out: orbax does
  not store empty arrays); `load()` returns (step, arrays, meta) of the newest complete
  step, or None when there is none.
  """

  def __init__(self, directory, keep: int = 2):
    import orbax.checkpoint as ocp

    if keep < 1:
      raise ValueError(f"keep={keep} must be >= 1")
    self.directory = pathlib.Path(directory).absolute()
    self.directory.mkdir(parents=True, exist_ok=True)
    self._ocp = ocp
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False,
                                           create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("kv", "meta"))

  def latest_step(self) -> int | None:
    self.manager.reload()
    return self.manager.latest_step()

  def save(self, arrays: dict, meta: dict) -> int:
    ocp = self._ocp
    step = (self.latest_step() or 0) + 1
    # A placeholder leaf keeps the tree non-empty when no session holds a page.
    tree = {"_": np.zeros(1, np.int8), **{k: v for k, v in arrays.items() if v is not None}}
    self.manager.save(step, args=ocp.args.Composite(kv=ocp.args.StandardSave(tree),
                                                    meta=ocp.args.JsonSave(meta)))
    self.manager.wait_until_finished()
    return step

  def load(self) -> tuple[int, dict, dict] | None:
    ocp = self._ocp
    step = self.latest_step()
    if step is None:
      return None
    out = self.manager.restore(step, args=ocp.args.Composite(kv=ocp.args.StandardRestore(),
                                                             meta=ocp.args.JsonRestore()))
    arrays = {k: v for k, v in out["kv"].items() if k != "_"}
    return step, arrays, out["meta"]

  def close(self) -> None:
    self.manager.close()
