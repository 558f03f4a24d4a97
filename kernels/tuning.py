"""Per-device-kind tuning of the Pallas kernels, and whether they beat XLA there (measured).

One `DeviceTuning` per GPU kind: block sizes, warps, stages and split policy
for decode and for ragged prefill, plus `kernel_faster`, which the default
attention dispatch reads (`AttentionConfig.default_for_backend`). It may be
True only where a run of `benchmarks/gpu_check.sh` on that kind measured the
kernels faster than the XLA path at every point of `kernel_bench.py`, and
`measured` then names that result file. The values below are starting
points derived from the shapes (H100 / H200: 132 SMs), not measurements.

Lookup is by substring of `jax.Device.device_kind` ("NVIDIA H100 80GB HBM3",
"NVIDIA H200"), first match wins; anything else gets DEFAULT.
"""

from __future__ import annotations

import dataclasses

from .attention_body import BlockSizes


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeviceTuning:
  """Kernel tuning for one device kind."""

  decode: BlockSizes = BlockSizes()
  prefill: BlockSizes = BlockSizes()  # block_q is replaced by prefill_rows // group
  prefill_rows: int = 64  # query rows (tokens x heads of a KV group) per prefill tile
  kernel_faster: bool = False  # measured faster than XLA's path at every benchmark point
  measured: str = ""  # the result file that measurement is in ("" = none)

  def __post_init__(self):
    if self.prefill_rows < 1 or self.prefill_rows & (self.prefill_rows - 1):
      raise ValueError(f"prefill_rows={self.prefill_rows} must be a power of two")
    if self.kernel_faster and not self.measured:
      raise ValueError("kernel_faster=True needs the measurement that shows it (measured=...)")

  def block_sizes(self, *, decode: bool, group: int) -> BlockSizes:
    """The kernel's BlockSizes for a model whose KV groups hold `group` query heads."""
    if decode:
      return self.decode
    return dataclasses.replace(self.prefill, block_q=max(1, self.prefill_rows // group))


DEFAULT = DeviceTuning()

_HOPPER = DeviceTuning(
    # Decode is bandwidth-bound: 64 keys a step (4 pages of 16), enough splits for
    # ~2 programs per SM at small batch, rows = the KV group padded to a power of two.
    decode=BlockSizes(pages_per_block=4, num_warps=4, num_stages=2, split_programs=264,
                      min_split_steps=2),
    # Prefill is matmul-bound: 64-row tiles against 64-key steps.
    prefill=BlockSizes(pages_per_block=4, num_warps=4, num_stages=2),
    prefill_rows=64,
    # docs/results/kernel_bench_h100.json (jax 0.11.2, SmolLM2 shapes, bf16) measured the
    # previous kernels 5-27x slower than XLA; the split-K kernels here are unmeasured.
    kernel_faster=False,
)

TABLE: dict[str, DeviceTuning] = {
    "H100": _HOPPER,
    "H200": _HOPPER,
}


def for_device(device_kind: str | None) -> DeviceTuning:
  """The tuning for a `device_kind` string (DEFAULT when no entry matches)."""
  for key, tuning in TABLE.items():
    if device_kind and key.lower() in device_kind.lower():
      return tuning
  return DEFAULT
