"""The one progress-bar helper: a tqdm bar, or a silent stand-in when disabled."""

from __future__ import annotations

from tqdm.auto import tqdm


def bar(total: int | None = None, *, enabled: bool = True, unit: str = "it", desc: str = "",
        leave: bool = False, items=None):
  """A tqdm bar over `items` (an iterable) or to `total`; `enabled=False` shows nothing."""
  return tqdm(items, total=total, disable=not enabled, unit=unit, desc=desc, leave=leave)
