"""Quality metrics of a reuse method against a reference run of the same prompts."""

from __future__ import annotations

import numpy as np

__all__ = ["next_token_quality"]


def next_token_quality(ref_logp, logp) -> dict:
  """Top-1 agreement and mean KL(ref || method) of next-token distributions [n, vocab]."""
  ref_logp, logp = np.asarray(ref_logp, np.float64), np.asarray(logp, np.float64)
  kl = np.sum(np.exp(ref_logp) * (ref_logp - logp), axis=-1)
  top1 = ref_logp.argmax(-1) == logp.argmax(-1)
  return {"top1_agreement": float(top1.mean()), "mean_kl": float(kl.mean()),
          "max_kl": float(kl.max())}
