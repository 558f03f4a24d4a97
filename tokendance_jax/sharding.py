"""Meshes, logical axis rules and placement helpers for sharded rounds.

A mesh always has two axes, `data` and `model` (size 1 when not asked for).
Arrays name their dimensions with logical axes; a rules table maps each
logical axis to a mesh axis or to None (replicated):

- params: q heads, kv heads and the MLP hidden dim over `model` (tensor
  parallel: Megatron-style column/row splits, so XLA's GSPMD inserts one
  all-reduce after `wo` and one after `w_down` per layer); the vocab over
  `model` (embedding gather and tied logits are masked + reduced).
- the page pool `[l, kv_heads, pages, page_size, e]`: kv heads over `model`;
  the `pages` axis is NOT sharded by default, so every `data` replica holds
  the whole pool (masters are readable from every shard at no cost).
- a round batch: the flat token axis over `data` when its bucketed length
  divides (small decode batches run replicated); block tables replicated.
  New K/V of a layer are all-gathered across `data` before the paged write.

Every jit-compiled step stays one program per mesh: inputs carry their
NamedShardings, outputs are pinned (tokens / log-probs replicated, the cache
in its own sharding, donated in place). Placement goes through
`make_array_from_callback`, so the same code runs on several processes
(`jax.distributed`), each passing the same host values.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tokendance_jax.config import CacheConfig, ModelConfig
from tokendance_jax.kvcache import KVCache

MESH_AXES = ("data", "model")

# logical axis -> mesh axis (None: replicated)
DEFAULT_RULES = (
    ("layers", None),
    ("embed", None),
    ("head_dim", None),
    ("page_slots", None),
    ("seqs", None),
    ("vocab", "model"),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("mlp", "model"),
    ("pages", None),
    ("tokens", "data"),
)

# param name -> logical axes of its dims (flattened heads * head_dim dims count heads)
PARAM_AXES = {
    "embed": ("vocab", "embed"),
    "final_norm": ("embed",),
    "wq": ("layers", "embed", "heads"),
    "wk": ("layers", "embed", "kv_heads"),
    "wv": ("layers", "embed", "kv_heads"),
    "wo": ("layers", "heads", "embed"),
    "w_gate": ("layers", "embed", "mlp"),
    "w_up": ("layers", "embed", "mlp"),
    "w_down": ("layers", "mlp", "embed"),
    "attn_norm": ("layers", "embed"),
    "mlp_norm": ("layers", "embed"),
}
CACHE_AXES = ("layers", "kv_heads", "pages", "page_slots", "head_dim")
TOKEN_FIELDS = ("tokens", "positions", "seq_ids", "slot_mapping")


def parse_mesh(spec: str) -> dict[str, int]:
  """"data=2,model=3" -> {"data": 2, "model": 3} (missing axes are 1)."""
  sizes = dict.fromkeys(MESH_AXES, 1)
  seen = set()
  for part in filter(None, (p.strip() for p in spec.split(","))):
    name, eq, value = part.partition("=")
    name = name.strip()
    if not eq or name not in MESH_AXES:
      raise ValueError(f"mesh spec {spec!r}: expected comma-separated axis=size with axes "
                       f"{' and '.join(MESH_AXES)}, got {part!r}")
    if name in seen:
      raise ValueError(f"mesh spec {spec!r}: axis {name!r} given twice")
    try:
      sizes[name] = int(value)
    except ValueError:
      raise ValueError(f"mesh spec {spec!r}: size of {name!r} is not an integer") from None
    if sizes[name] < 1:
      raise ValueError(f"mesh spec {spec!r}: size of {name!r} must be >= 1")
    seen.add(name)
  if not seen:
    raise ValueError(f"mesh spec {spec!r} names no axis (e.g. 'data=2,model=3')")
  return sizes


def make_mesh(spec: str | dict, devices=None) -> jax.sharding.Mesh:
  """A ("data", "model") mesh of Auto axes over the first data*model devices.

  With several processes every global device must be in the mesh (each
  process holds its part), so the sizes must multiply to the device count.
  """
  sizes = parse_mesh(spec) if isinstance(spec, str) else {**dict.fromkeys(MESH_AXES, 1), **spec}
  devices = list(jax.devices() if devices is None else devices)
  need = math.prod(sizes[a] for a in MESH_AXES)
  desc = ",".join(f"{a}={sizes[a]}" for a in MESH_AXES)
  if need > len(devices):
    hint = (f"; on CPU set XLA_FLAGS=--xla_force_host_platform_device_count={need} before "
            "jax starts" if devices[0].platform == "cpu" else "")
    raise ValueError(f"mesh {desc} needs {need} devices; {len(devices)} available{hint}")
  if jax.process_count() > 1 and need != len(devices):
    raise ValueError(f"mesh {desc} has {need} devices; with {jax.process_count()} processes it "
                     f"must cover all {len(devices)} global devices")
  shape = tuple(sizes[a] for a in MESH_AXES)
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices[:need])


def describe(mesh: jax.sharding.Mesh) -> str:
  return ",".join(f"{a}={mesh.shape[a]}" for a in mesh.axis_names)


@dataclasses.dataclass(frozen=True)
class MeshPlan:
  """A mesh plus its logical axis rules; hashable, so jitted steps are cached per plan."""

  mesh: jax.sharding.Mesh
  rules: tuple[tuple[str, str | None], ...] = DEFAULT_RULES

  def __post_init__(self):
    for logical, axis in self.rules:
      if axis is not None and axis not in self.mesh.axis_names:
        raise ValueError(f"rule {logical!r} -> {axis!r}: the mesh has axes {self.mesh.axis_names}")
    if self.mesh_axis("pages") is not None:
      raise ValueError("rule 'pages' must map to None: block tables hold global page ids, so "
                       "every device keeps the whole page axis (shard kv heads instead)")

  def mesh_axis(self, logical: str | None) -> str | None:
    return None if logical is None else dict(self.rules).get(logical)

  def spec(self, name: str, logical: tuple, sizes: tuple[int, ...]) -> P:
    """PartitionSpec for array `name` whose dims have these logical axes and logical sizes.

    Raises ValueError when two dims map to one mesh axis or a size does not
    divide by its mesh axis.
    """
    axes = [self.mesh_axis(lg) for lg in logical]
    used: dict[str, str] = {}
    for lg, axis, size in zip(logical, axes, sizes, strict=True):
      if axis is None:
        continue
      if axis in used:
        raise ValueError(f"{name}: logical axes {used[axis]!r} and {lg!r} both map to mesh "
                         f"axis {axis!r}")
      used[axis] = lg
      n = self.mesh.shape[axis]
      if size % n:
        raise ValueError(f"{name}: {lg}={size} is not divisible by mesh axis {axis!r} of size "
                         f"{n}; change the mesh or map {lg!r} to None (replicate) in the rules")
    return P(*axes)

  def sharding(self, spec: P) -> NamedSharding:
    return NamedSharding(self.mesh, spec)

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  # -- params and cache -------------------------------------------------------------

  def param_shardings(self, params: dict, cfg: ModelConfig) -> dict:
    """NamedSharding per param (same tree), checked against the model's head counts."""
    units = _logical_sizes(cfg)

    def one(path, x):
      name = path[-1].key
      logical = PARAM_AXES.get(name)
      if logical is None or len(logical) != x.ndim:
        raise ValueError(f"param {name!r} of shape {x.shape} has no logical axes in PARAM_AXES")
      sizes = tuple(units.get(lg, d) for lg, d in zip(logical, x.shape, strict=True))
      return self.sharding(self.spec(f"param {name!r}", logical, sizes))

    return jax.tree_util.tree_map_with_path(one, params)

  def cache_sharding(self, cfg: ModelConfig, cache_cfg: CacheConfig,
                     n_layers: int | None = None) -> NamedSharding:
    sizes = (n_layers or cfg.n_layers, cfg.n_kv_heads, cache_cfg.num_pages, cache_cfg.page_size,
             cfg.head_dim)
    return self.sharding(self.spec("the KV cache", CACHE_AXES, sizes))

  def shard_params(self, params: dict, cfg: ModelConfig) -> dict:
    return jax.tree.map(place, params, self.param_shardings(params, cfg))

  def create_cache(self, cfg: ModelConfig, cache_cfg: CacheConfig):
    """A zeroed `KVCache` created directly in its sharding (no host copy)."""
    shape = (cfg.n_layers, cfg.n_kv_heads, cache_cfg.num_pages, cache_cfg.page_size,
             cfg.head_dim)
    s = self.cache_sharding(cfg, cache_cfg)
    zeros = jax.jit(lambda: jnp.zeros(shape, cache_cfg.dtype), out_shardings=s)
    return KVCache(k=zeros(), v=zeros())

  # -- batches ------------------------------------------------------------------

  def token_sharding(self, n: int) -> NamedSharding:
    """Flat token axis over its mesh axis when n divides, else replicated."""
    axis = self.mesh_axis("tokens")
    if axis is None or n % self.mesh.shape[axis]:
      return self.replicated
    return self.sharding(P(axis))

  def shard_batch(self, batch):
    """`model.Batch` (host arrays) -> global arrays: token fields split, tables replicated."""
    t = np.shape(batch.tokens)[0]
    fields = {f.name: place(getattr(batch, f.name),
                            self.token_sharding(t) if f.name in TOKEN_FIELDS else self.replicated)
              for f in dataclasses.fields(batch)}
    return type(batch)(**fields)

  def shard_tokens(self, x):
    """A [t] per-token host array, split like the batch's token fields."""
    return place(x, self.token_sharding(np.shape(x)[0]))

  def replicate(self, tree):
    return jax.tree.map(lambda x: place(x, self.replicated), tree)

  # -- accounting -----------------------------------------------------------------

  def bytes_per_device(self, tree) -> int:
    """Bytes of `tree` held by this process's first device (shards only)."""
    dev = jax.local_devices()[0]
    if dev not in set(self.mesh.devices.flat):
      dev = next(d for d in self.mesh.devices.flat if d.process_index == jax.process_index())
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards
               if s.device == dev)

  def kv_fraction_per_device(self) -> float:
    """Share of every page a device holds (pages unsharded: 1 / kv-head shards)."""
    axis = self.mesh_axis("kv_heads")
    return 1.0 / (self.mesh.shape[axis] if axis else 1)


def as_plan(mesh) -> MeshPlan | None:
  """None, a Mesh, a spec string or a MeshPlan -> MeshPlan (or None)."""
  if mesh is None or isinstance(mesh, MeshPlan):
    return mesh
  if isinstance(mesh, str):
    mesh = make_mesh(mesh)
  return MeshPlan(mesh)


def place(x, sharding: NamedSharding) -> jax.Array:
  """Host or device array -> a global array in `sharding` (works across processes)."""
  if isinstance(x, jax.Array) and x.sharding == sharding:
    return x
  if jax.process_count() == 1:
    return jax.device_put(x, sharding)
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def _logical_sizes(cfg: ModelConfig) -> dict[str, int]:
  return {"heads": cfg.n_heads, "kv_heads": cfg.n_kv_heads, "mlp": cfg.ffn_dim,
          "vocab": cfg.vocab_size, "embed": cfg.d_model, "layers": cfg.n_layers}


@functools.cache
def jit_step(fn, plan: MeshPlan, out_shardings, **jit_kw):
  """`fn` jit-compiled for `plan`: pinned output shardings, called with `plan=plan` (a static
  argument of `fn`, so attention runs per device, see `shard_attention`) under the plan's
  mesh; cached per plan."""
  own = functools.wraps(fn)(lambda *a, **k: fn(*a, **k))  # a trace cache of its own
  compiled = jax.jit(own, out_shardings=out_shardings, **jit_kw)

  @functools.wraps(fn)
  def run(*args, **kwargs):
    with jax.set_mesh(plan.mesh):  # the mesh is part of jit's cache key
      return compiled(*args, plan=plan, **kwargs)

  return run


def shard_attention(plan: MeshPlan, fn, args: tuple, kwargs: dict, *, decode: bool):
  """A paged attention call (kernel or reference) run per device with `jax.shard_map`.

  Each device attends its own query heads over its own kv heads (heads and
  kv heads on one mesh axis keep GQA groups whole) for its slice of the
  tokens, reading the page pool, which is whole on every `data` shard; the
  block tables are replicated (decode: split by row like the tokens). No
  communication. With heads and kv heads on different axes (kv heads
  replicated) it falls back to XLA's partitioner.

  args: (q [t, h, e], k_pages, v_pages [l, kv_heads, pages, page_size, e],
  block_tables [s, w], positions [t]) plus seq_ids [t] when not decode;
  kwargs: layer, block_pos, block_len and static tuning args.
  """
  heads, kv = plan.mesh_axis("heads"), plan.mesh_axis("kv_heads")
  if heads != kv:
    return fn(*args, **kwargs)
  tok = plan.mesh_axis("tokens") if plan.token_sharding(args[0].shape[0]).spec else None
  rows = tok if decode else None
  cache = P(None, kv, None, None, None)
  specs = (P(tok, heads, None), cache, cache, P(rows, None), P(tok), P(tok))[:len(args)]
  arrays = {k: v for k, v in kwargs.items() if isinstance(v, jax.Array)}
  static = {k: v for k, v in kwargs.items() if k not in arrays}
  array_specs = {k: P() if k == "layer" else P(rows, None) for k in arrays}

  def local(args, arrays):
    return fn(*args, **arrays, **static)

  return jax.shard_map(local, mesh=plan.mesh, in_specs=(specs, array_specs),
                       out_specs=P(tok, heads, None), check_vma=False)(args, arrays)
