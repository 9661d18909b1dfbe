"""Meshes and the one table that maps logical axis names onto mesh axes.

Model code names every parameter and key activation with logical names from the
closed set `LOGICAL_NAMES`. Mesh axis names appear only in this module.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ftjax.errors import UserError

MESH_AXES = ('data', 'fsdp', 'expert', 'tensor')

LOGICAL_NAMES = frozenset(
    {'batch', 'seq', 'embed', 'mlp', 'heads', 'kv_heads', 'head_dim', 'vocab', 'layers', 'lora',
     'expert'}
)

# logical name -> mesh axis (or tuple of axes); absent or None = replicated.
# The `expert` mesh axis (size 1 unless mesh.shape has four entries) splits the experts of a
# mixture-of-experts layer between devices; everywhere else it is one more data-parallel axis.
# Without it, expert weights are split over `fsdp` along their embed dim like any weight.
RULES: dict[str, dict[str, str | tuple[str, ...] | None]] = {
    # Fully sharded data parallel: weights split over `fsdp` along their embed dim.
    'fsdp': dict(batch=('data', 'fsdp', 'expert'), embed='fsdp', expert='expert'),
    # FSDP plus Megatron-style tensor parallelism over `tensor`.
    'fsdp_tp': dict(
        batch=('data', 'fsdp', 'expert'),
        embed='fsdp',
        expert='expert',
        mlp='tensor',
        heads='tensor',
        kv_heads='tensor',
        vocab='tensor',
    ),
}

_ACTIVE: contextvars.ContextVar[tuple[Mesh, dict] | None] = contextvars.ContextVar(
    'ftjax_sharding', default=None
)


class MeshError(UserError):
  """The requested mesh or batch does not fit the available devices."""


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """The four axis sizes of `shape`, `(data, fsdp, tensor)` (no expert axis) or `(data, fsdp,
  expert, tensor)`, with a single -1 filled so that the product equals `num_devices`."""
  given = tuple(int(s) for s in shape)  # as the user wrote it, for the messages
  shape = (given[0], given[1], 1, given[2]) if len(given) == 3 else given
  if len(shape) != len(MESH_AXES):
    raise MeshError(
        f'mesh.shape={given} must have 3 entries (data, fsdp, tensor) or 4 (data, fsdp, expert, '
        'tensor).')
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise MeshError(f'mesh.shape={given}: use positive sizes and at most one -1 (fills the rest).')
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise MeshError(
          f'mesh.shape={given}: the fixed axes ({known} devices) do not divide the '
          f'{num_devices} available devices.'
      )
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise MeshError(
        f'mesh.shape={given} needs {math.prod(shape)} devices, but {num_devices} are available; '
        f'set --config.mesh.shape so that the product is {num_devices} (one entry may be -1).'
    )
  return shape


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None, *,
              num_slices: int = 1) -> Mesh:
  """Builds a mesh over `devices` (default: all) with axes `MESH_AXES`.

  With `num_slices` > 1 (multi-slice TPU), the `data` axis is split across slices over the
  data-center network and every other axis stays inside a slice (ICI), using
  `mesh_utils.create_hybrid_device_mesh`.
  """
  devices = list(jax.devices() if devices is None else devices)
  resolved = resolve_mesh_shape(shape, len(devices))
  types = (AxisType.Auto,) * len(MESH_AXES)
  if num_slices == 1:
    return jax.make_mesh(resolved, MESH_AXES, axis_types=types, devices=devices)
  if resolved[0] % num_slices:
    raise MeshError(f'mesh.num_slices={num_slices} must divide the data axis of '
                    f'mesh.shape={resolved}: data parallelism is what crosses slices')
  if not all(hasattr(d, 'slice_index') for d in devices):
    raise MeshError(f'mesh.num_slices={num_slices}, but these {devices[0].platform} devices '
                    'belong to no TPU slices; use num_slices=1')
  from jax.experimental import mesh_utils

  ici = (resolved[0] // num_slices, *resolved[1:])
  grid = mesh_utils.create_hybrid_device_mesh(ici, (num_slices, 1, 1, 1), devices)
  return Mesh(grid, MESH_AXES, axis_types=types)


def get_rules(name: str) -> dict:
  if name not in RULES:
    raise KeyError(f'mesh.rules={name!r} is not a known rule set; choose one of {sorted(RULES)}.')
  return RULES[name]


def spec(
    names: Sequence[str | None],
    rules: dict,
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
) -> P:
  """Maps logical names to a PartitionSpec.

  A mesh axis is used at most once (first dimension wins), and with `shape` and
  `mesh` given, a dimension that the mesh axes do not divide stays replicated.
  """
  used: set[str] = set()
  out = []
  for i, name in enumerate(names):
    if name is not None and name not in LOGICAL_NAMES:
      raise ValueError(f'unknown logical axis name {name!r}; allowed: {sorted(LOGICAL_NAMES)}')
    axes = rules.get(name) if name else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(a for a in axes if a not in used)
    if mesh is not None:
      axes = tuple(a for a in axes if mesh.shape[a] > 1)
      if shape is not None and shape[i] % math.prod(mesh.shape[a] for a in axes):
        axes = ()
    used.update(axes)
    out.append(axes[0] if len(axes) == 1 else (axes or None))
  return P(*out)


def logical_names(variable: nnx.Variable) -> tuple[str | None, ...]:
  """The logical axis names a variable was created with ('layers' added by scan)."""
  names = variable.get_metadata().get('out_sharding')
  return tuple(names) if names else (None,) * np.ndim(variable.get_value())


def state_shardings(tree: Any, mesh: Mesh, rules: dict) -> Any:
  """NamedShardings for a pytree of (abstract) arrays.

  Variables (parameters, and the optimizer moments that mirror them) are laid out
  by their logical names; any other leaf (a step counter, say) is replicated.
  """

  def one(x):
    if isinstance(x, nnx.Variable):
      shape = np.shape(x.get_value())
      return x.replace(NamedSharding(mesh, spec(logical_names(x), rules, shape, mesh)))
    return NamedSharding(mesh, P())

  return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, rules: dict, ndim: int = 2) -> NamedSharding:
  """Sharding of a `[batch, seq, ...]` input array."""
  return NamedSharding(mesh, spec(('batch',) + (None,) * (ndim - 1), rules, mesh=mesh))


def batch_shards(mesh: Mesh, rules: dict) -> int:
  """How many ways the batch dimension is split."""
  axes = spec(('batch',), rules, mesh=mesh)[0]
  axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
  return math.prod(mesh.shape[a] for a in axes)


@contextlib.contextmanager
def use(mesh: Mesh, rules: dict) -> Iterator[None]:
  """The single ambient context: activations are constrained with these rules."""
  # Not `jax.set_mesh`: NNX would then read the logical names as mesh axis names.
  token = _ACTIVE.set((mesh, rules))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def platform() -> str:
  """'cpu', 'gpu' or 'tpu': of the active mesh's devices, else of JAX's default backend."""
  active = _ACTIVE.get()
  if active is None:
    return jax.default_backend()
  kind = active[0].devices.flat[0].platform
  return 'gpu' if kind in ('cuda', 'rocm') else kind


def shard_map_specs(arrays: Sequence[tuple[jax.Array, Sequence[str | None]]]
                    ) -> tuple[Mesh | None, list[P]]:
  """The active mesh and PartitionSpecs of (array, logical names) pairs, for `jax.shard_map`
  around kernels XLA cannot partition itself; (None, []) outside `use`."""
  active = _ACTIVE.get()
  if active is None:
    return None, []
  mesh, rules = active
  return mesh, [spec(names, rules, x.shape, mesh) for x, names in arrays]


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Constrains an activation to its logical layout; identity outside `use`."""
  active = _ACTIVE.get()
  if active is None:
    return x
  mesh, rules = active
  return jax.lax.with_sharding_constraint(
      x, NamedSharding(mesh, spec(names, rules, x.shape, mesh))
  )


def sharded_init(make: Any, mesh: Mesh, rules: dict) -> tuple[Any, Any]:
  """The graph of module `make()` and a jitted function creating its sharded state.

  The module is first traced abstractly (no memory), its parameter shardings are
  derived from RULES, and the real initialisation is jitted with those
  `out_shardings`, so no device ever holds the whole model.
  """
  graphdef, abstract_state = nnx.split(nnx.eval_shape(make))
  shardings = state_shardings(abstract_state, mesh, rules)
  return graphdef, jax.jit(lambda: nnx.state(make()), out_shardings=shardings)


def create_sharded(make: Any, mesh: Mesh, rules: dict) -> Any:
  """Builds the nnx module `make()` directly into sharded device memory."""
  graphdef, init = sharded_init(make, mesh, rules)
  state = init()
  logging.info('created %d parameters on mesh %s', count_params(state), dict(mesh.shape))
  return nnx.merge(graphdef, state)


def assert_sufficiently_sharded(state: Any, *, min_bytes: int = 1 << 20) -> None:
  """Raises AssertionError naming every array of `min_bytes` or more that each device holds
  whole (after MaxText's `assert_params_sufficiently_sharded`): under FSDP-style rules a big
  weight replicated on every chip means a rule is missing."""
  whole = [(jax.tree_util.keystr(path), x.shape)
           for path, x in jax.tree_util.tree_leaves_with_path(state)
           if isinstance(x, jax.Array) and x.nbytes >= min_bytes and len(x.sharding.device_set) > 1
           and x.addressable_shards[0].data.nbytes == x.nbytes]
  assert not whole, f'{len(whole)} arrays of >= {min_bytes} bytes are not sharded: {whole[:5]}'


def count_params(state: Any) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))
