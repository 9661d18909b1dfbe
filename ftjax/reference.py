"""`objective.precompute_ref`: the reference log-probabilities of every batch, computed once.

Before the first step, one forward pass over exactly the batches training will see (the data
pipeline is deterministic) and over the held-out pairs gives each row's reference
log-probabilities of chosen and rejected, from the initial weights (LoRA: the base, adapters
off). They are written with the run (`ref_logps.npz`) and read back on resume, never
recomputed, so a full fine-tune holds a single model and a resumed run is bitwise the same.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from ftjax import config as config_lib
from ftjax import data, sharding
from ftjax import step as step_lib

FILE = 'ref_logps.npz'


class Table:
  """Reference log-probabilities per train step (`[steps, B, 2]`) and eval batch."""

  def __init__(self, train: np.ndarray, eval_: np.ndarray):
    self.train, self.eval = train, eval_

  def save(self, workdir: str) -> None:
    if jax.process_index() == 0:
      path = os.path.join(workdir, FILE)
      with open(path + '.partial', 'wb') as f:
        np.savez(f, train=self.train, eval=self.eval)
        f.flush()
        os.fsync(f.fileno())
      os.replace(path + '.partial', path)

  @staticmethod
  def load(workdir: str, steps: int) -> Table | None:
    path = os.path.join(workdir, FILE)
    if not os.path.isfile(path):
      return None
    with np.load(path) as f:
      table = Table(f['train'], f['eval'])
    if len(table.train) < steps:
      raise config_lib.ConfigError(
          f'{path} holds reference log-probabilities for {len(table.train)} steps, fewer than '
          f'train.steps={steps}: with objective.precompute_ref, train.steps cannot be raised '
          'on resume (the reference weights are gone); start a new run')
    return table

  def put(self, step: int, batch: dict[str, jax.Array], like: NamedSharding) -> dict:
    """`batch` of step `step` with its rows' reference log-probabilities, laid out as its rows
    are (the table is in global row order)."""
    return dict(batch, ref_logps=data.global_rows(self.train[step - 1], like))


def compute(trainer: Any, r: config_lib.Resolved,
            eval_set: list[dict[str, np.ndarray]] | None) -> Table:
  """One forward pass of the initial weights over the run's train batches and eval pairs."""
  fn = jax.jit(lambda params, frozen, batch: step_lib.reference_logps(
      params, frozen, batch, trainer.ref, graphdef=trainer.graphdef,
      loss_chunk=r.model.loss_chunk))
  c_data = r.data
  batches = data.train_batches(list(c_data.sources), c_data.options,
                               global_batch=c_data.global_batch, seed=r.train.seed,
                               pack=c_data.pack, workers=c_data.workers)

  def over(local_batches, count):
    out = []
    with sharding.use(trainer.mesh, trainer.rules):
      for _, local in zip(range(count), local_batches, strict=False):
        batch = data.to_global(local, trainer.batch_sharding)
        out.append(multihost_utils.process_allgather(
            fn(trainer.state.params, trainer.frozen, batch), tiled=True))
    return np.stack(out) if out else np.zeros((0, c_data.global_batch, 2), np.float32)

  return Table(over(batches, r.train.steps), over(iter(eval_set or []), len(eval_set or [])))
