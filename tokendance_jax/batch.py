"""Packing ragged chunks of tokens into one bucketed `model.Batch`.

Shapes are padded to power-of-two buckets (`bucket`) so a steady state never
recompiles: rows, tokens and block-table width each round up.
"""

from __future__ import annotations

import numpy as np

from tokendance_jax import model

__all__ = ["bucket", "build_batch"]


def bucket(n: int, minimum: int = 1) -> int:
  """Smallest power of two >= max(n, minimum)."""
  n = max(n, minimum)
  return 1 << (n - 1).bit_length()


def build_batch(chunks, decode: bool = False):
  """Pack chunks into a bucketed `model.Batch`.

  A chunk is (table, tokens, start, n) feeding tokens[start:start + n], or
  (table, tokens, positions) feeding tokens at scattered increasing
  positions. Row r samples (its logits are returned) when its last fed
  position is the end of tokens. Returns (batch, set of sampling rows).
  """
  chunks = [c if len(c) == 3 else (c[0], c[1], np.arange(c[2], c[2] + c[3])) for c in chunks]
  rows = bucket(len(chunks))
  t = rows if decode else bucket(sum(len(p) for *_, p in chunks), 16)
  width = bucket(max(len(table.pages) for table, *_ in chunks), 4)
  tokens = np.zeros(t, np.int32)
  positions = np.full(t, -1, np.int32)
  seq_ids = np.zeros(t, np.int32)
  slots = np.full(t, -1, np.int32)
  tables = np.zeros((3, rows, width), np.int32)
  tables[1] = np.iinfo(np.int32).max // 2
  logits_index = np.zeros(rows, np.int32)
  sampled_rows, cursor = set(), 0
  for r, (table, toks, pos) in enumerate(chunks):
    span = slice(cursor, cursor + len(pos))
    tokens[span] = np.asarray(toks)[pos]
    positions[span] = pos
    seq_ids[span] = r
    slots[span] = table.slots_at(pos)
    tables[:, r] = table.rows(width)
    if len(pos) and pos[-1] == len(toks) - 1:
      sampled_rows.add(r)
      logits_index[r] = cursor + len(pos) - 1
    cursor += len(pos)
  batch = model.Batch(tokens=tokens, positions=positions, seq_ids=seq_ids, slot_mapping=slots,
                      block_tables=tables[0], block_pos=tables[1], block_len=tables[2],
                      logits_index=logits_index)
  return batch, sampled_rows
