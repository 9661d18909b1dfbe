"""Orbax checkpoints of a run under `workdir/checkpoints/<step>/`.

For now a run saves its trained parameters when it finishes; `ftjax export` restores them
onto any mesh by restoring into an abstract target that carries the new shardings.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp
from flax import nnx


def directory(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def save_params(workdir: str, step: int, params: nnx.State) -> None:
  """Saves `params` at `step` and waits until the checkpoint is committed."""
  with ocp.CheckpointManager(directory(workdir)) as manager:
    manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(
        params.to_pure_dict())))
    manager.wait_until_finished()


def latest_step(workdir: str) -> int | None:
  if not os.path.isdir(directory(workdir)):
    return None
  with ocp.CheckpointManager(directory(workdir)) as manager:
    return manager.latest_step()


def restore_params(workdir: str, abstract_params: nnx.State, shardings: nnx.State,
                   step: int | None = None) -> nnx.State:
  """The saved parameters, restored straight into `shardings` (any mesh)."""
  step = latest_step(workdir) if step is None else step
  if step is None:
    raise FileNotFoundError(f'{directory(workdir)}: no checkpoint to restore')
  target = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract_params.to_pure_dict(), shardings.to_pure_dict())
  with ocp.CheckpointManager(directory(workdir)) as manager:
    restored = manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(target)))
  params = jax.tree.map(lambda x: x, abstract_params)
  nnx.replace_by_pure_dict(params, restored['params'])
  return params
