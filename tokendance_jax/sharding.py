"""Meshes, logical axis rules and placement helpers for sharded rounds.

A mesh always has two axes, `data` and `model` (size 1 when not asked for).
Arrays name their dimensions with logical axes; a rules table maps each
logical axis to a mesh axis or to None (replicated):

- params: q heads, kv heads and the MLP hidden dim over `model` (tensor
  parallel: Megatron-style column/row splits, so XLA's GSPMD inserts one
  all-reduce after `wo` and one after `w_down` per layer); the vocab over
  `model` (embedding gather and tied logits are masked + reduced).
- the page pool `[l, kv_heads, pages, page_size, e]`: kv heads over `model`,
  pages over `data` (a sharded pool): device row d of the `data` axis holds
  pages [d * L, (d + 1) * L) only, with an allocator range of its own
  (`paging.PageAllocator(shards=)`), so each `data` shard adds its pages to
  the pool. An agent's pages all sit on one shard and its tokens in that
  shard's slice of the batch (`batch.build_batch(shards=)`), so the paged
  write and attention run per device under `shard_map` on local page ids, and
  a master has a replica on each shard whose agents read it. Mapping `pages` to None
  (`REPLICATED_POOL_RULES`) keeps the whole pool on every `data` shard.
- a round batch: the flat token axis over `data` (on a replicated pool only
  when its bucketed length divides; small decode batches then run
  replicated); block tables replicated, split by row under `shard_map`.

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
    ("pages", "data"),
    ("tokens", "data"),
)


def _pool_replicated(rules):
  """`rules` with the page axis replicated: every `data` shard holds the whole pool."""
  return tuple((lg, None if lg == "pages" else ax) for lg, ax in rules)


# the layout before sharded pools
REPLICATED_POOL_RULES = _pool_replicated(DEFAULT_RULES)

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
    if self.mesh_axis("pages") not in (None, "data"):
      raise ValueError("rule 'pages' must map to 'data' (a sharded pool) or None (the whole "
                       "pool on every data shard)")
    if self.mesh_axis("pages") is not None and self.mesh_axis("tokens") != "data":
      raise ValueError("a pool sharded over 'data' needs 'tokens' on 'data' too: each shard "
                       "computes the tokens of its own agents")

  @property
  def pages_sharded(self) -> bool:
    """The pool's pages are split over `data` (more than one shard)."""
    return self.mesh_axis("pages") == "data" and self.mesh.shape["data"] > 1

  @property
  def shards(self) -> int:
    """Pool shards: the `data` size on a sharded pool, else 1."""
    return self.mesh.shape["data"] if self.pages_sharded else 1

  def with_replicated_pool(self) -> MeshPlan:
    """This plan with the whole pool on every `data` shard (e.g. a scratch cache whose page
    ids do not follow the shards)."""
    return dataclasses.replace(self, rules=_pool_replicated(self.rules))

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
    """Flat token axis over its mesh axis when n divides, else replicated (a batch on a
    sharded pool always divides: one equal slice per shard)."""
    axis = self.mesh_axis("tokens")
    if axis is None or n % self.mesh.shape[axis]:
      if self.pages_sharded:
        raise ValueError(f"{n} tokens do not split over {self.shards} pool shards")
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
    """Share of the pool a device holds: 1 / (kv-head shards x pool shards)."""
    axis = self.mesh_axis("kv_heads")
    return 1.0 / ((self.mesh.shape[axis] if axis else 1) * self.shards)


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


def local_pages(ids, num_local: int, fill: int):
  """Inside `shard_map` over `data`: global page ids -> this shard's local ids; ids on
  other shards (and the padding) become `fill`."""
  local = ids - jax.lax.axis_index("data") * num_local
  return jnp.where((local >= 0) & (local < num_local), local, fill)


def _pool_specs(plan: MeshPlan) -> P:
  return P(None, plan.mesh_axis("kv_heads"), plan.mesh_axis("pages") if plan.pages_sharded
           else None, None, None)


def shard_write(plan: MeshPlan, write, cache_k, cache_v, layer, k, v, slot_mapping):
  """The paged write of one layer's new k, v [t, kv_heads, e] on a sharded pool: each device
  writes its slice of the tokens into its own pages (slots on other shards are dropped)."""
  kv, cache = plan.mesh_axis("kv_heads"), _pool_specs(plan)
  tokens = P("data", kv, None)

  def local(ck, cv, layer, k, v, slots):
    size = ck.shape[2] * ck.shape[3]  # slots per shard
    s = slots - jax.lax.axis_index("data") * size
    slots = jnp.where((slots >= 0) & (s >= 0) & (s < size), s, -1)
    return write(ck, cv, layer, k, v, slots)

  return jax.shard_map(local, mesh=plan.mesh, in_specs=(cache, cache, P(), tokens, tokens,
                                                        P("data")),
                       out_specs=(cache, cache), check_vma=False)(cache_k, cache_v, layer, k, v,
                                                                  slot_mapping)


def shard_copy_pages(plan: MeshPlan, k, v, src, dst):
  """Pages dst[i] <- src[i] in every layer on a sharded pool, across shards: each device
  contributes the sources it holds, one `psum` over `data` gives every device all of them,
  and each writes the destinations it holds (out-of-range dst: padding, skipped)."""
  cache = _pool_specs(plan)

  def local(k, v, src, dst):
    n = k.shape[2]
    s = local_pages(src, n, -1)
    d = local_pages(dst, n, n)

    def one(x):
      mine = jnp.where((s >= 0)[None, None, :, None, None], x[:, :, jnp.maximum(s, 0)], 0)
      got = jax.lax.psum(mine, "data")
      return x.at[:, :, d].set(got, mode="drop")

    return one(k), one(v)

  return jax.shard_map(local, mesh=plan.mesh, in_specs=(cache, cache, P(), P()),
                       out_specs=(cache, cache), check_vma=False)(k, v, src, dst)


def shard_attention(plan: MeshPlan, fn, args: tuple, kwargs: dict, *, decode: bool):
  """A paged attention call (kernel or reference) run per device with `jax.shard_map`.

  Each device attends its own query heads over its own kv heads (heads and
  kv heads on one mesh axis keep GQA groups whole) for its slice of the
  tokens. On a replicated pool it reads the whole pool and the block tables
  are replicated (decode: split by row like the tokens). On a sharded pool
  the tokens of shard d's agents are its slice, block tables and sequence ids
  are split by row too (local rows), and page ids become local. No
  communication. With heads and kv heads on different axes (kv heads
  replicated) it falls back to XLA's partitioner, on a replicated pool only.

  args: (q [t, h, e], k_pages, v_pages [l, kv_heads, pages, page_size, e],
  block_tables [s, w], positions [t]) plus seq_ids [t] when not decode;
  kwargs: layer, block_pos, block_len and static tuning args.
  """
  heads, kv = plan.mesh_axis("heads"), plan.mesh_axis("kv_heads")
  if heads != kv:
    if plan.pages_sharded:
      raise ValueError("a sharded pool needs heads and kv heads on one mesh axis")
    return fn(*args, **kwargs)
  tok = plan.mesh_axis("tokens") if plan.token_sharding(args[0].shape[0]).spec else None
  rows = tok if decode or plan.pages_sharded else None
  cache = _pool_specs(plan)
  specs = (P(tok, heads, None), cache, cache, P(rows, None), P(tok), P(tok))[:len(args)]
  arrays = {k: v for k, v in kwargs.items() if isinstance(v, jax.Array)}
  static = {k: v for k, v in kwargs.items() if k not in arrays}
  array_specs = {k: P() if k == "layer" else P(rows, None) for k in arrays}

  def local(args, arrays):
    if plan.pages_sharded:
      q, k_pages, v_pages, tables, *rest = args
      args = (q, k_pages, v_pages, local_pages(tables, k_pages.shape[2], 0), *rest)
    return fn(*args, **arrays, **static)

  return jax.shard_map(local, mesh=plan.mesh, in_specs=(specs, array_specs),
                       out_specs=P(tok, heads, None), check_vma=False)(args, arrays)
