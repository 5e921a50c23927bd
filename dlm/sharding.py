"""One mesh ('data', 'fsdp', 'tensor') from config; logical axis names → PartitionSpecs.

One rules table maps the logical axes of parameters (`out_sharding` metadata) and of activations
(`activation_*`, constrained inside the model while an `activation_sharding(mesh, rules)`
context is active at trace time) onto the mesh.
"""
import contextlib
import math
import threading
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dlm.errors import ConfigError

AXES = ('data', 'fsdp', 'tensor')
# Logical axis name → mesh axes (None = replicated): the default `config.sharding.rules`.
DEFAULT_RULES = (
    ('batch', ('data', 'fsdp')),
    ('vocab', 'tensor'),
    ('embed', 'fsdp'),
    ('heads', 'tensor'),
    ('mlp', 'tensor'),
    ('layers', None),
    ('norm', None),
    # Activations: rows over every data-parallel shard (FSDP included: each device computes its
    # own rows, with the weights gathered), the residual stream replicated over 'tensor'.
    ('activation_batch', ('data', 'fsdp')),
    ('activation_length', None),
    ('activation_embed', None),
    ('activation_heads', 'tensor'),
    ('activation_vocab', 'tensor'),
)


def mesh_shape(sharding_cfg, num_devices: int) -> tuple[int, int, int]:
  """Resolve the configured sizes; at most one may be -1 (= all remaining devices)."""
  dims = [int(sharding_cfg[a]) for a in AXES]
  if sum(d == -1 for d in dims) > 1 or any(d == 0 or d < -1 for d in dims):
    raise ConfigError(f'sharding sizes {dict(zip(AXES, dims))}: each must be ≥ 1, and at most '
                     'one may be -1 (fill with the remaining devices)')
  known = math.prod(d for d in dims if d != -1)
  if -1 in dims:
    if num_devices % known:
      raise ConfigError(f'{num_devices} devices do not split over fixed sharding sizes '
                       f'{dict(zip(AXES, dims))}')
    dims[dims.index(-1)] = num_devices // known
  if math.prod(dims) != num_devices:
    raise ConfigError(f'sharding {dict(zip(AXES, dims))} needs {math.prod(dims)} devices but '
                     f'{num_devices} are in use; set --config.sharding.fsdp=-1 to fill')
  return tuple(dims)


def make_mesh(sharding_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(sharding_cfg, len(devices))
  return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES),
                       devices=devices)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], rules, mesh: Mesh,
                    what: str | None = None) -> P:
  """Map logical axis names to mesh axes. A dim the mesh axes do not divide stays replicated
  for an activation (what=None: e.g. a sampler's single row); for a parameter (`what` names it)
  it is a ConfigError, never a silently replicated weight and its optimizer moments."""
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for i, (name, size) in enumerate(zip(names, shape)):
    axes = table.get(name) if name is not None else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
    n = math.prod(mesh.shape[a] for a in axes)
    if axes and size % n == 0:
      used.update(axes)
      spec.append(axes[0] if len(axes) == 1 else axes)
    elif axes and what is not None:
      over = ' × '.join(f'{a}={mesh.shape[a]}' for a in axes)
      hint = ('; or pad the rows, as LLaDA pads 126349 tokens to 126464 rows: '
              'model.num_embeddings=<a multiple of 128> with model.mask_id=<the tokenizer\'s>'
              if name == 'vocab' else '')
      raise ConfigError(
          f'parameter {what} {tuple(shape)}: dim {i} ({name!r}, size {size}) does not split '
          f'over mesh axis {over} (size {n}); choose sharding sizes that divide it{hint}')
    else:
      spec.append(None)
  return P(*spec)


def param_shardings(abstract_state: Any, rules, mesh: Mesh) -> Any:
  """NamedShardings for an nnx.State whose Variables carry `out_sharding` logical names.
  Raises ConfigError for a parameter dim that its mesh axes do not divide."""
  def one(path, v):
    names = v.get_metadata().get('out_sharding') or (None,) * len(v.shape)
    what = '.'.join(str(getattr(k, 'key', k)) for k in path)
    return NamedSharding(mesh, logical_to_spec(names, v.shape, rules, mesh, what=what))
  return jax.tree.map_with_path(one, abstract_state,
                                is_leaf=lambda x: isinstance(x, nnx.Variable))


# ------------------------------------------------------------------------------------------------
# Activation sharding: the model calls `constrain` at its boundaries; it acts only while a
# context is active (entered inside the jitted function, so it is on at trace time). Mesh-less
# code (unit tests, conversion, a bare model call) sees no constraint at all.

_active = threading.local()


def _table(rules) -> dict:
  """The rules as a dict; activation names they lack take DEFAULT_RULES' mapping (a run's saved
  rules may predate them)."""
  table = {k: v for k, v in DEFAULT_RULES if k.startswith('activation_')}
  table.update({r[0]: r[1] for r in rules})
  return table


@contextlib.contextmanager
def activation_sharding(mesh: Mesh | None, rules=DEFAULT_RULES):
  """Within: `constrain` pins activations to `mesh` by the logical axes of `rules`.
  mesh=None (or a one-device mesh) turns constraints off."""
  prev = getattr(_active, 'ctx', None)
  _active.ctx = None if mesh is None or mesh.size == 1 else (mesh, _table(rules))
  try:
    yield
  finally:
    _active.ctx = prev


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """with_sharding_constraint of x by logical axis names under the active context (no-op
  without one). A dim its mesh axes do not divide is replicated (e.g. a sampler's single row)."""
  active = active_spec(names, x.shape)
  return x if active is None else jax.lax.with_sharding_constraint(x, NamedSharding(*active))


def active_spec(names: Sequence[str | None], shape: Sequence[int]) -> tuple[Mesh, P] | None:
  """(mesh, PartitionSpec) `constrain` would pin `shape` to under the active context, or None
  without one: for kernels that must run per shard (`jax.shard_map`), e.g. splash attention."""
  ctx = getattr(_active, 'ctx', None)
  if ctx is None:
    return None
  mesh, table = ctx
  return mesh, logical_to_spec(names, shape, table.items(), mesh)


def mesh_of(tree: Any) -> Mesh | None:
  """The mesh the arrays of a pytree are laid out on (the first NamedSharding's), or None."""
  for x in jax.tree.leaves(tree):
    s = getattr(x, 'sharding', None)
    if isinstance(s, NamedSharding):
      return s.mesh
  return None


def batch_sharding(mesh: Mesh, rules, ndim: int = 2) -> NamedSharding:
  """Leading (batch) axis over the data-parallel axes, the rest replicated."""
  table = dict(rules)
  axes = table.get('batch')
  axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
  return NamedSharding(mesh, P(axes, *([None] * (ndim - 1))))


def batch_shardings(tree: Any, mesh: Mesh, rules) -> Any:
  """batch_sharding for every leaf of a batch pytree (each leaf's axis 0 is the batch)."""
  return jax.tree.map(lambda x: batch_sharding(mesh, rules, len(np.shape(x))), tree)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh, rules) -> int:
  spec = batch_sharding(mesh, rules).spec[0]
  return int(np.prod([mesh.shape[a] for a in spec]))


def check_batch(rows: int, mesh: Mesh, rules, microbatches: int, what: str) -> None:
  """A step's rows must split evenly into micro-batches, each over the data-parallel shards."""
  dp = data_parallel_size(mesh, rules)
  if rows % (dp * microbatches):
    raise ConfigError(f'{what} = {rows} rows must split into train.microbatches={microbatches} '
                     f'× {dp} data-parallel shards')


def hashable_rules(rules) -> tuple:
  """The rules as nested tuples (a jit static argument); configs and saved JSON give lists."""
  axes = lambda a: a if a is None or isinstance(a, str) else tuple(a)
  return tuple((str(r[0]), axes(r[1])) for r in rules)


def put_global(tree: Any, shardings: Any) -> Any:
  """Host arrays that every process holds in full (e.g. the held-out prompts every process
  evaluates) as global jax.Arrays laid out by `shardings`; each device gets its slice."""
  def one(x, s):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])
  return jax.tree.map(one, tree, shardings)


def global_batch(local: Any, shardings: Any) -> Any:
  """Assemble this process's rows (an array or a pytree of them, with matching shardings) into
  global jax.Arrays: no host holds the whole batch."""
  return jax.tree.map(lambda x, s: jax.make_array_from_process_local_data(s, x), local, shardings)


def process_rows(mesh: Mesh, rules, rows: int) -> slice:
  """The rows of a `rows`-row batch that this process's devices hold under the batch sharding:
  what the process must read (its share of the global batch). One contiguous block per process
  (mesh devices in process order, the 'tensor' axis within a process); any other layout is a
  ConfigError naming it, never a batch assembled from the wrong rows."""
  index_map = batch_sharding(mesh, rules, 1).addressable_devices_indices_map((rows,))
  held = sorted({(s[0].indices(rows)[0], s[0].indices(rows)[1]) for s in index_map.values()})
  lo, hi = held[0][0], held[-1][1]
  n = hi - lo
  if any(b[0] != a[1] for a, b in zip(held, held[1:])) or rows % n or lo % n:
    raise ConfigError(f'process {jax.process_index()} holds rows {held} of a {rows}-row batch '
                      'under this mesh; multi-process input needs one contiguous, equal block '
                      'per process: order the mesh devices by process (sharding.tensor within '
                      'a host)')
  return slice(lo, hi)


def share(mesh: Mesh, rules, rows: int) -> tuple[int, int]:
  """(index, count): this process reads block `index` of `count` equal blocks of the batch
  (count = 1 when every process holds every row, e.g. a mesh without data parallelism)."""
  block = process_rows(mesh, rules, rows)
  n = block.stop - block.start
  return block.start // n, rows // n


def gather_rows(local: np.ndarray, block: slice, count: int = 0) -> tuple[np.ndarray, int]:
  """(the global batch's rows, the sum of `count` over the processes' distinct blocks) from each
  process's rows `local` = rows `block` of it: small host values such as rewards, which every
  process then logs alike."""
  local = np.asarray(local)
  if jax.process_count() == 1:
    return local, count
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  header, rows = multihost_utils.process_allgather(
      (np.array([block.start, block.stop, count]), local))  # [processes, …]
  out, seen, total = [None] * int(header[:, 1].max()), set(), 0
  for (lo, hi, c), part in zip(np.asarray(header), np.asarray(rows)):
    if lo not in seen:  # blocks held by several processes (no data parallelism) count once
      seen.add(lo)
      total += int(c)
      out[lo:hi] = list(part)
  return np.asarray(out, local.dtype), total
