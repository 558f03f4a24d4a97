"""Packing ragged chunks of tokens into one bucketed `model.Batch`.

Shapes are padded to power-of-two buckets (`bucket`) so a steady state never
recompiles: rows, tokens and block-table width each round up.
"""

from __future__ import annotations

import numpy as np

from tokendance_jax import model, sampling

__all__ = ["bucket", "build_batch", "row_sampling"]


def bucket(n: int, minimum: int = 1) -> int:
  """Smallest power of two >= max(n, minimum)."""
  n = max(n, minimum)
  return 1 << (n - 1).bit_length()


def build_batch(chunks, decode: bool = False, shards: int = 1):
  """Pack chunks into a bucketed `model.Batch`.

  A chunk is (table, tokens, start, n) feeding tokens[start:start + n], or
  (table, tokens, positions) feeding tokens at scattered increasing
  positions. A chunk samples (its row's logits are returned) when its last
  fed position is the end of tokens.

  With shards > 1 (a sharded pool) the batch is `shards` equal slices, one
  per pool shard, each bucketed to the largest: slice d holds the rows and
  tokens of the chunks whose table is on shard d (`BlockTable.shard`), with
  sequence ids local to the slice. Returns (batch, set of sampling chunks,
  the row of each chunk).
  """
  chunks = [c if len(c) == 3 else (c[0], c[1], np.arange(c[2], c[2] + c[3])) for c in chunks]
  by_shard = [[i for i, c in enumerate(chunks) if _shard(c[0], shards) == d]
              for d in range(shards)]
  rows = bucket(max(len(g) for g in by_shard))
  t = rows if decode else bucket(max(sum(len(chunks[i][2]) for i in g) for g in by_shard), 16)
  width = bucket(max(len(table.pages) for table, *_ in chunks), 4)
  tokens = np.zeros(shards * t, np.int32)
  positions = np.full(shards * t, -1, np.int32)
  seq_ids = np.zeros(shards * t, np.int32)
  slots = np.full(shards * t, -1, np.int32)
  tables = np.zeros((3, shards * rows, width), np.int32)
  tables[1] = np.iinfo(np.int32).max // 2
  logits_index = np.zeros(shards * rows, np.int32)
  sampled, row_of = set(), [0] * len(chunks)
  for d, group in enumerate(by_shard):
    cursor = d * t
    for k, i in enumerate(group):
      table, toks, pos = chunks[i]
      r = row_of[i] = d * rows + k
      span = slice(cursor, cursor + len(pos))
      tokens[span] = np.asarray(toks)[pos]
      positions[span] = pos
      seq_ids[span] = k
      slots[span] = table.slots_at(pos)
      tables[:, r] = table.rows(width)
      if len(pos) and pos[-1] == len(toks) - 1:
        sampled.add(i)
        logits_index[r] = cursor + len(pos) - 1
      cursor += len(pos)
  batch = model.Batch(tokens=tokens, positions=positions, seq_ids=seq_ids, slot_mapping=slots,
                      block_tables=tables[0], block_pos=tables[1], block_len=tables[2],
                      logits_index=logits_index)
  return batch, sampled, row_of


def _shard(table, shards: int) -> int:
  if not 0 <= table.shard < shards:
    raise ValueError(f"a block table on shard {table.shard}; the pool has {shards} shard(s)")
  return table.shard


def row_sampling(params, steps, row_of, batch) -> sampling.SamplingArrays:
  """Per-chunk sampling params and steps, scattered to their batch rows (`build_batch`'s
  row of each chunk); padding rows decode greedily."""
  rows = batch.block_tables.shape[0]
  by_row, step = [None] * rows, [0] * rows
  for p, n, r in zip(params, steps, row_of, strict=True):
    by_row[r], step[r] = p, n
  return sampling.SamplingArrays.from_params(by_row, step, rows)
