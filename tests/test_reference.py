"""The real model's next-token logits against Hugging Face transformers (independent code).

transformers builds LlamaForCausalLM from the same GGUF with its own
dequantization, its own Q/K un-permutation and its own attention; we compare
our paged forward (jnp reference attention, and the Pallas kernel in
interpret mode) on several prompts. Tolerance: max |logit difference|
<= 5e-4 in float32 (measured <= 7e-5; logits range over about +-37); top-1 must agree.
"""

import numpy as np
import pytest

from tokendance_jax import model
from tokendance_jax.config import AttentionConfig, CacheConfig
from tokendance_jax.engine import Engine
from tokendance_jax.sampling import SamplingParams

pytestmark = pytest.mark.real_model
torch = pytest.importorskip("torch")

LOGIT_ATOL = 5e-4
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Agent 3 said: I think we should trade the wheat for iron before winter.",
    "1, 2, 3, 5, 8, 13, 21,",
]


@pytest.fixture(scope="module")
def tok():
  from tokendance_jax.tokenizer import Tokenizer

  return Tokenizer.from_gguf()


def _ours(params, cfg, prompts_ids, attn):
  """Last-token logits for every prompt from one ragged paged batch."""
  cc = CacheConfig(num_pages=64, page_size=16)
  toks, pos, sid, last, tables = [], [], [], [], np.zeros((len(prompts_ids), 8), np.int32)
  for i, ids in enumerate(prompts_ids):
    tables[i, :4] = 1 + 4 * i + np.arange(4)
    toks += ids
    pos += range(len(ids))
    sid += [i] * len(ids)
    last.append(len(toks) - 1)
  batch = model.Batch.contiguous(tokens=toks, positions=pos, seq_ids=sid, block_tables=tables,
                                 logits_index=last, page_size=cc.page_size)
  logits, _ = model.forward(params, model.KVCache.create(cfg, cc), batch, cfg=cfg, attn=attn)
  return np.asarray(logits)


def _hf(hf_model, ids):
  with torch.no_grad():
    return hf_model(torch.tensor([ids])).logits[0, -1].numpy()


@pytest.mark.parametrize("attn", [AttentionConfig(),
                                  AttentionConfig(impl="pallas", interpret=True)],
                         ids=["reference", "kernel"])
def test_logits_match_transformers(real_params, hf_model, tok, attn):
  params, cfg = real_params
  prompts_ids = [tok.encode(p) for p in PROMPTS]
  ours = _ours(params, cfg, prompts_ids, attn)
  for i, ids in enumerate(prompts_ids):
    ref = _hf(hf_model, ids)
    err = np.abs(ours[i] - ref).max()
    assert err <= LOGIT_ATOL, f"prompt {i}: max |dlogit| = {err:.2e}"
    assert ours[i].argmax() == ref.argmax()


def test_batched_generation_equals_one_at_a_time(real_params, tok):
  params, cfg = real_params
  chats = ["What is the capital of France?", "Name a color.", "Count to five."]
  prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": c}])) for c in chats]
  sp = SamplingParams(max_tokens=12)
  batched = Engine(params, cfg, cache_cfg=CacheConfig(num_pages=128)).generate(prompts, sp)
  for p, b in zip(prompts, batched, strict=True):
    single = Engine(params, cfg, cache_cfg=CacheConfig(num_pages=128)).generate([p], sp)[0]
    assert b.output_ids == single.output_ids
  assert "Paris" in tok.decode(batched[0].output_ids)
