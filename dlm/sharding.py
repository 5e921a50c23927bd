"""One mesh ('data', 'fsdp', 'tensor') from config; logical axis names → PartitionSpecs."""
import math
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


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], rules, mesh: Mesh) -> P:
  """Map logical axis names to mesh axes; a dim the mesh axes do not divide stays replicated."""
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name, size in zip(names, shape):
    axes = table.get(name) if name is not None else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
    if axes and size % math.prod(mesh.shape[a] for a in axes) == 0:
      used.update(axes)
      spec.append(axes[0] if len(axes) == 1 else axes)
    else:
      spec.append(None)
  return P(*spec)


def param_shardings(abstract_state: Any, rules, mesh: Mesh) -> Any:
  """NamedShardings for an nnx.State whose Variables carry `out_sharding` logical names."""
  def one(v):
    names = v.get_metadata().get('out_sharding') or (None,) * len(v.shape)
    return NamedSharding(mesh, logical_to_spec(names, v.shape, rules, mesh))
  return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


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


def global_batch(local: Any, shardings: Any) -> Any:
  """Assemble this process's rows (an array or a pytree of them, with matching shardings) into
  global jax.Arrays: no host holds the whole batch."""
  return jax.tree.map(lambda x, s: jax.make_array_from_process_local_data(s, x), local, shardings)
