"""`ftjax plan`: compile the real train step for a TPU slice on this machine, and say if it fits.

With libtpu installed (`pip install -e '.[tpu]'`), JAX can describe a TPU topology it is not
running on and compile for it ahead of time. The compiled step's memory analysis gives the
per-device HBM the run needs (arguments: weights, optimizer state, batch; temporaries:
activations and gradients; outputs), compared with the chip's HBM.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from ftjax import bench, sharding
from ftjax.config import Resolved
from ftjax.errors import UserError
from ftjax.models import layers

# libtpu on a machine without TPUs: no metadata-server lookups and no exclusive lock (a
# libtpu-enabled process started next to this one must not block it). Set only in the process
# that plans, right before libtpu starts: not TPU_WORKER_HOSTNAMES, which would make `ftjax
# train` (via ftjax.distributed) believe it runs on a TPU VM.
_LIBTPU_ENV = (('TPU_SKIP_MDS_QUERY', '1'), ('ALLOW_MULTIPLE_LIBTPU_LOAD', '1'))


class PlanError(UserError):
  """The topology cannot be planned for (unknown name, no libtpu)."""


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str  # the JAX topology name prefix
  hbm_bytes: int  # per JAX device
  cores_in_name: bool  # v4/v5p accelerator types count TensorCores (2 per chip), not chips
  dims: int  # 3-D torus (v4, v5p) or 2-D (v5e, v6e)


CHIPS = {
    'v4': Chip('v4', 32 * 2**30, True, 3),
    'v5p': Chip('v5p', 95 * 2**30, True, 3),
    'v5e': Chip('v5e', 16 * 2**30, False, 2),
    'v6e': Chip('v6e', 32 * 2**30, False, 2),
}
_ALIASES = {'v5litepod': 'v5e', 'v5lite': 'v5e', 'v6lite': 'v6e'}


def parse_topology(name: str) -> tuple[Chip, tuple[int, ...]]:
  """`v5p-64` -> (v5p, (2, 4, 4)): the chip and the torus shape of that accelerator type."""
  if re.match(r'(h100|h200|a100|b200|gpu)', name.strip().lower()):
    raise PlanError(f'--topology={name!r}: JAX can only compile for GPUs with a GPU and its CUDA '
                    'plugin present, so GPU slices cannot be planned from here; run `ftjax bench` '
                    'on one GPU host (peak_memory_bytes) or plan for a TPU type such as v5p-64')
  m = re.fullmatch(r'(v\d+[a-z]*)-(\d+)', name.strip().lower())
  if not m or _ALIASES.get(m[1], m[1]) not in CHIPS:
    raise PlanError(f'--topology={name!r}: expected a TPU accelerator type such as v4-32, '
                    f'v5litepod-8 (or v5e-8), v5p-64, v6e-8')
  chip = CHIPS[_ALIASES.get(m[1], m[1])]
  count = int(m[2])
  chips = count // 2 if chip.cores_in_name else count
  if chips < 1 or chips & (chips - 1):
    raise PlanError(f'--topology={name!r}: {chips} chips; slices have a power-of-two count')
  # Slices grow their smallest axis, the last of equals first: 2x2 -> 2x4 -> 4x4 -> 4x8;
  # a 3-D torus fills its first two axes first: 2x2x1 -> 2x2x2 -> 2x2x4 -> 2x4x4 -> 4x4x4.
  shape, first = [1] * chip.dims, [0, 1] if chip.dims == 3 else []
  while math.prod(shape) < chips:
    i = first.pop(0) if first else max(i for i in range(chip.dims) if shape[i] == min(shape))
    shape[i] *= 2
  return chip, tuple(shape)


def topology_devices(name: str) -> tuple[Chip, list[Any]]:
  """The devices of a described (not attached) TPU slice."""
  chip, shape = parse_topology(name)
  try:
    import libtpu  # noqa: F401
  except ImportError:
    raise PlanError(
        "ftjax plan needs libtpu to compile for TPUs: pip install -e '.[tpu]'") from None
  for key, value in _LIBTPU_ENV:
    os.environ.setdefault(key, value)
  from jax.experimental import topologies

  dims = (*shape, 1) if len(shape) == 2 else shape
  host = tuple(min(d, b) for d, b in zip(dims, (2, 2, 1), strict=True))
  desc = topologies.get_topology_desc(
      topology_name=f'{chip.name}:{"x".join(map(str, shape))}', platform='tpu',
      chip_config_name='default', chips_per_host_bounds=host, num_slices=1)
  return chip, list(desc.devices)


def run(config: ml_collections.ConfigDict, topology: str) -> dict[str, Any]:
  """Per-device HBM of the config's train step on `topology`; fits or not, and what to change."""
  chip, devices = topology_devices(topology)
  start = time.perf_counter()
  r, trainer = bench.trainer_for(config, abstract=True, devices=devices)
  arch = r.model.arch
  shape = (r.data.global_batch, r.data.seq_len)
  batch = {k: jax.ShapeDtypeStruct(shape, np.int32, sharding=trainer.batch_sharding)
           for k in ('tokens', 'targets', 'positions', 'segment_ids', 'loss_mask')}
  with sharding.use(trainer.mesh, trainer.rules):
    lowered = trainer.train_step.lower(trainer.state, trainer.frozen, batch, trainer.ref)
  try:
    mem = bench.memory(lowered.compile())
    per_device = dict(arguments=mem['arguments'], temporaries=mem['temporaries'],
                      outputs=mem['outputs'], aliased=mem['aliased'], total=mem['total'])
  except jax.errors.JaxRuntimeError as e:
    # The TPU compiler refuses a program whose temporaries exceed HBM; it says how much.
    m = re.search(r'HLO temporaries \(([\d.]+)([KMGT])\)', str(e))
    if 'RESOURCE_EXHAUSTED' not in str(e) or not m:
      raise
    args = _per_device_bytes((trainer.state, trainer.frozen, batch))
    state = _per_device_bytes(trainer.state)  # donated: the new state reuses these buffers
    temps = int(float(m[1]) * 2 ** (10 * ' KMGT'.index(m[2])))
    per_device = dict(arguments=args, temporaries=temps, outputs=state, aliased=state,
                      total=args + temps, note='temporaries as the TPU compiler reported when '
                      'it refused the program: ' + str(e).splitlines()[0][:300])
  fits = per_device['total'] <= chip.hbm_bytes
  return dict(
      topology=topology, device_kind=devices[0].device_kind, num_devices=len(devices),
      mesh=dict(trainer.mesh.shape), per_device_bytes=per_device,
      device_hbm_bytes=chip.hbm_bytes, fits=fits,
      headroom_bytes=chip.hbm_bytes - per_device['total'],
      params=sharding.count_params(trainer.state.params) + sharding.count_params(trainer.frozen),
      trainable_params=sharding.count_params(trainer.state.params),
      suggestions=suggestions(r, per_device, chip.hbm_bytes, trainer.mesh),
      compile_s=time.perf_counter() - start,
      model=dict(preset=r.model.preset, layers=arch.num_layers, embed_dim=arch.embed_dim,
                 global_batch=shape[0], seq_len=shape[1], remat=r.model.remat,
                 lora_rank=r.lora.rank if r.lora else 0, param_dtype=r.model.param_dtype,
                 dtype=r.model.dtype),
  )


def _per_device_bytes(tree: Any) -> int:
  """Bytes one device holds of a tree of sharded shape structs."""
  return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


def suggestions(r: Resolved, per_device: dict[str, int], hbm: int,
                mesh: jax.sharding.Mesh) -> list[str]:
  """Knobs that shrink whichever part of the memory dominates, largest effect first."""
  out = []
  total, temps, args = per_device['total'], per_device['temporaries'], per_device['arguments']
  if total <= 0.9 * hbm:
    return out
  over = f'{total / 2**30:.1f} GiB needed of {hbm / 2**30:.0f} GiB'
  if temps >= args:
    with sharding.use(mesh, sharding.get_rules(r.mesh.rules)):  # 'auto' as on the planned chips
      remat = layers.resolve_remat(r.model.remat)
    lighter = {'none': "dots (keep matmul outputs) or full (keep layer inputs only)",
               'dots': "offload (matmul outputs in host memory) or full",
               'offload': 'full'}.get(remat)
    if lighter:
      out.append(f'{over}; activations dominate ({temps / 2**30:.1f} GiB): '
                 f'--config.model.remat={lighter}')
    rows = r.data.global_batch // max(sharding.batch_shards(mesh, sharding.get_rules(
        r.mesh.rules)), 1)
    if rows > 1:
      out.append(f'{rows} rows per device: halve data.global_batch and double '
                 'optim.grad_accum (same optimizer batch, half the activations)')
    if r.model.loss_chunk == 0 or r.model.loss_chunk > 256:
      out.append('--config.model.loss_chunk=256: smaller LM-head chunks')
  else:
    if not r.lora:
      out.append(f'{over}; weights and optimizer state dominate ({args / 2**30:.1f} GiB): '
                 'LoRA (--config.lora.rank=16) keeps optimizer state only for the adapters')
    elif not r.lora.quantize_base:
      out.append(f"{over}: --config.lora.quantize_base='int8' stores the frozen base in 8 bits")
    if r.model.param_dtype == 'float32':
      out.append('--config.model.param_dtype=bfloat16 halves the stored weights')
    fsdp = mesh.shape['fsdp']
    if mesh.shape['data'] > 1:
      out.append(f"move devices from data ({mesh.shape['data']}) to fsdp ({fsdp}) in "
                 'mesh.shape: fsdp splits the weights, data copies them')
    out.append('a larger slice: per-device weights and optimizer state shrink with the fsdp size')
  return out
