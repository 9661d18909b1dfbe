"""Orbax checkpoints of a run under `workdir/checkpoints/<step>/`: never lose work.

A checkpoint holds the train state (step, trainable params, optimizer state), the data
iterator's state (one file per process, via grain's Orbax handler), and metadata (ftjax
version, mesh, model, the resolved config). Saves are asynchronous: the loop blocks only for
the device-to-host copy. Orbax writes into a temporary directory and renames it when every
process has finished, so a half-written checkpoint is never listed and never restored.
Restores go into an abstract target carrying the *current* shardings, so a checkpoint saved on
one mesh restores onto any other without materialising whole arrays on one device.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from ftjax.errors import CheckpointError

CHECKSUMS = 'ftjax_checksums.json'  # per step folder: sha256 of every file, written after commit
ITEMS = ('state', 'meta')  # item folders every ftjax checkpoint has ('data' when it has a stream)


class CorruptCheckpoint(CheckpointError):
  """A checkpoint's files are missing, truncated or altered (a restore falls back past it)."""


def _digest(path: str) -> str:
  with open(path, 'rb') as f:
    return hashlib.file_digest(f, 'sha256').hexdigest()


def _files(step_dir: str) -> list[str]:
  return sorted(os.path.relpath(os.path.join(root, name), step_dir)
                for root, _, names in os.walk(step_dir) for name in names if name != CHECKSUMS)


def write_checksums(step_dir: str) -> None:
  """Records size and sha256 of every file of a committed step folder (atomically)."""
  try:
    paths = {rel: os.path.join(step_dir, rel) for rel in _files(step_dir)}
    table = {rel: [os.path.getsize(path), _digest(path)] for rel, path in paths.items()}
  except FileNotFoundError:  # rotated away while we were reading it
    return
  tmp = os.path.join(step_dir, CHECKSUMS + '.tmp')
  try:
    with open(tmp, 'w') as f:
      json.dump(table, f)
    os.replace(tmp, os.path.join(step_dir, CHECKSUMS))
  except FileNotFoundError:
    pass


def verify(step_dir: str) -> str | None:
  """What is wrong with a step folder's files (missing, truncated, altered), or None.

  A checkpoint saved without a checksum table (an older ftjax, or a crash between the commit
  and the table) is only checked for its item folders; Orbax's own reads catch the rest.
  """
  if not os.path.isdir(step_dir):
    return f'{step_dir}: not found'
  for item in ITEMS:
    if not os.path.isdir(os.path.join(step_dir, item)):
      return f'{os.path.join(step_dir, item)}: missing'
  table_path = os.path.join(step_dir, CHECKSUMS)
  if not os.path.isfile(table_path):
    return None
  try:
    with open(table_path) as f:
      table = json.load(f)
  except (OSError, ValueError):
    return f'{table_path}: unreadable checksum table'
  for rel, (size, digest) in sorted(table.items()):
    path = os.path.join(step_dir, rel)
    if not os.path.isfile(path):
      return f'{path}: missing'
    if os.path.getsize(path) != size:
      return f'{path}: truncated or resized ({os.path.getsize(path)} bytes, saved {size})'
    if _digest(path) != digest:
      return f'{path}: checksum mismatch (the file changed after it was saved)'
  return None


def directory(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def _leaves(tree: Any) -> dict[str, Any]:
  """Leaves by a path that reads the same for live pytrees and Orbax's saved metadata."""

  def name(k):
    for attr in ('key', 'name', 'idx'):
      if hasattr(k, attr):
        return str(getattr(k, attr))
    return str(k)

  return {'.'.join(name(k) for k in path): x
          for path, x in jax.tree_util.tree_leaves_with_path(tree)}


class Manager:
  """Saves every `every_steps` steps and/or `every_minutes` minutes; restores the latest."""

  def __init__(self, root: str, *, every_steps: int = 0, every_minutes: float = 0.0,
               max_to_keep: int | None = 3, keep_period: int | None = None,
               async_save: bool = True):
    self.root = root
    self.every_steps, self.every_minutes = every_steps, every_minutes
    self._last_save = time.monotonic()
    self._saved: set[int] = set()  # steps this manager saved (a stop can coincide with the end)
    self._unhashed: list[int] = []  # saved steps whose checksum table is not written yet
    self._hasher: threading.Thread | None = None
    # create=False: nothing is written under the run directory before the first save.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, keep_period=keep_period or None,
        enable_async_checkpointing=async_save, create=False,
        async_options=ocp.AsyncOptions(timeout_secs=1800))
    self._manager = ocp.CheckpointManager(root, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def verify(self, step: int) -> str | None:
    """What is wrong with the files of checkpoint `step`, or None if they are intact."""
    return verify(os.path.join(self.root, str(step)))

  def _hash_committed(self, background: bool) -> None:
    """Writes the checksum tables of committed saves (process 0), off the training thread."""
    if self._hasher is not None:
      self._hasher.join()
      self._hasher = None
    steps, self._unhashed = self._unhashed, []
    if not steps or jax.process_index() != 0:
      return

    def work():
      for step in steps:
        write_checksums(os.path.join(self.root, str(step)))

    if background:
      self._hasher = threading.Thread(target=work, name='ftjax-checksums', daemon=True)
      self._hasher.start()
    else:
      work()

  def due(self, step: int) -> bool:
    """Whether the schedule asks for a save after `step` (same answer on every host)."""
    by_steps = self.every_steps > 0 and step % self.every_steps == 0
    by_time = self.every_minutes > 0 and (time.monotonic() - self._last_save) >= (
        60 * self.every_minutes)
    if self.every_minutes > 0 and jax.process_count() > 1:
      # Hosts' clocks differ: let process 0 decide for everyone.
      from jax.experimental import multihost_utils

      by_time = bool(multihost_utils.broadcast_one_to_all(np.asarray(by_time)))
    return by_steps or by_time

  def save(self, step: int, state: Any, data_iterator: Any = None,
           metadata: dict[str, Any] | None = None) -> None:
    """Starts an async save of `state` (and the data iterator); returns after the D2H copy.

    Checkpoints at `step` or later (a run resumed from an older step retrains through them)
    are replaced: deleted before this save starts, so the newest checkpoint is always this
    run's.
    """
    if step in self._saved:
      return
    self._manager.wait_until_finished()  # Orbax waits for the previous save here anyway
    self._hash_committed(background=True)
    for old in self.all_steps():
      if old >= step:
        logging.warning('replacing checkpoint %d of an earlier attempt (resumed from an older '
                        'step)', old)
        self._manager.delete(old)
    if jax.process_index() == 0:
      os.makedirs(self.root, exist_ok=True)
    items = dict(state=ocp.args.StandardSave(state),
                 meta=ocp.args.JsonSave(metadata or {}))
    if data_iterator is not None:
      items['data'] = grain.checkpoint.CheckpointSave(data_iterator)
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    self._saved.add(step)
    self._unhashed.append(step)
    self._last_save = time.monotonic()

  def wait(self) -> None:
    """Blocks until every started save is committed and checksummed (errors of the background
    save surface here)."""
    self._manager.wait_until_finished()
    self._hash_committed(background=False)

  def reload(self) -> None:
    """Re-reads the steps on disk (after another component removed some)."""
    self._manager.reload()

  def wait_quietly(self) -> None:
    """`wait` on the way out of a failed run: a save error is logged, not raised over the
    error that stopped the run."""
    try:
      self.wait()
    except Exception as e:  # noqa: BLE001
      logging.error('the checkpoint save in flight failed: %s', e)

  def move_aside(self, step: int) -> str:
    """Moves a corrupt checkpoint out of the way (kept for inspection, never deleted)."""
    src = os.path.join(self.root, str(step))
    dst = os.path.join(os.path.dirname(self.root), 'checkpoints_corrupt', str(step))
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(dst), exist_ok=True)
      if os.path.exists(dst):
        dst = f'{dst}.{int(time.time())}'
      shutil.move(src, dst)
    self._manager.reload()
    return dst

  def restore(self, step: int, abstract_state: Any, data_iterator: Any = None) -> Any:
    """The state at `step`, restored into `abstract_state`'s shapes, dtypes and shardings."""
    self._check_compatible(step, abstract_state)
    items = dict(state=ocp.args.StandardRestore(abstract_state))
    shared_data_state = None
    if data_iterator is not None:
      shared_data_state = self._data_state_from_other_process_count(step)
      if shared_data_state is None:
        items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    if shared_data_state is not None:
      data_iterator.set_state(shared_data_state)
    return restored['state']

  def _data_state_from_other_process_count(self, step: int) -> dict[str, Any] | None:
    """The iterator state when the checkpoint was saved by a different number of processes.

    Unpacked pipelines keep the same position on every host, so one state serves any count;
    packed pipelines do not, and are refused with a message.
    """
    folder = os.path.join(self.root, str(step), 'data')
    mine = f'process_{jax.process_index()}-of-{jax.process_count()}.json'
    if not os.path.isdir(folder) or os.path.exists(os.path.join(folder, mine)):
      return None
    states = []
    for name in sorted(os.listdir(folder)):
      if name.startswith('process_') and name.endswith('.json'):
        with open(os.path.join(folder, name)) as f:
          states.append(json.load(f))
    if not states or any(s != states[0] for s in states):
      raise CheckpointError(
          f'{folder}: the data position was saved by {len(states)} processes that were at '
          f'different places (packed data), so it cannot be restored with '
          f'{jax.process_count()} processes; resume with {len(states)} processes')
    return states[0]

  def metadata(self, step: int) -> dict[str, Any]:
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
        'meta']

  def _check_compatible(self, step: int, abstract_state: Any) -> None:
    where = os.path.join(self.root, str(step))
    item = os.path.join(where, 'state')
    # The item's handler reads the tree metadata (the step-level metadata file belongs to the
    # manager, which is why a whole-checkpoint reader warned on every resume).
    if not os.path.isfile(os.path.join(item, '_METADATA')):
      raise CorruptCheckpoint(f'{os.path.join(item, "_METADATA")} is missing')
    try:
      saved = ocp.StandardCheckpointHandler().metadata(epath.Path(item)).tree
    except Exception as e:  # Orbax raises several types for unreadable metadata
      first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
      raise CorruptCheckpoint(f'{item}: unreadable checkpoint metadata ({first})') from None
    want, have = _leaves(abstract_state), _leaves(saved)
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing or extra:
      raise CheckpointError(
          f'{where} does not hold this model: missing {missing[:3]}, unexpected {extra[:3]} '
          '(a different model, or LoRA vs full fine-tuning?)')
    for key, target in want.items():
      shape = tuple(getattr(have[key], 'shape', ()) or ())
      if tuple(target.shape) != shape:
        raise CheckpointError(f'{where}: {key} has shape {shape} in the checkpoint, but the '
                              f'model expects {tuple(target.shape)} (a different architecture?)')

  def reached_preemption(self, step: int) -> bool:
    """Multi-host: whether every host has agreed to stop at `step` (JAX's preemption sync)."""
    return self._manager.reached_preemption(step)

  def close(self) -> None:
    if self._hasher is not None:
      self._hasher.join()
    self._manager.close()


def find_step_dir(path: str) -> tuple[str, int]:
  """`path` is a checkpoints folder (its latest step) or one step folder inside it."""
  path = os.path.abspath(path)
  base = os.path.basename(path)
  if base.isdigit():
    return os.path.dirname(path), int(base)
  manager = ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(create=False))
  step = manager.latest_step()
  manager.close()
  if step is None:
    raise CheckpointError(f'ckpt.resume={path!r}: no committed checkpoint there')
  return path, step


def latest_step(workdir: str) -> int | None:
  if not os.path.isdir(directory(workdir)):
    return None
  manager = ocp.CheckpointManager(directory(workdir),
                                  options=ocp.CheckpointManagerOptions(create=False))
  step = manager.latest_step()
  manager.close()
  return step


def restore_params(workdir: str, abstract_params: nnx.State, shardings: nnx.State,
                   step: int | None = None) -> nnx.State:
  """Only the trained parameters of a run (for export), restored into `shardings`."""
  step = latest_step(workdir) if step is None else step
  if step is None:
    raise FileNotFoundError(f'{directory(workdir)}: no checkpoint to restore')
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract_params, shardings)
  manager = ocp.CheckpointManager(directory(workdir),
                                  options=ocp.CheckpointManagerOptions(create=False))
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item={'params': target}, restore_args=jax.tree.map(
          lambda s: ocp.ArrayRestoreArgs(sharding=s), {'params': shardings}),
      partial_restore=True)))
  manager.close()
  return restored['state']['params']



def bench(state: Any, root: str, *, repeats: int = 3) -> dict[str, Any]:
  """Blocking time of an async save (what the training loop waits for) vs the whole save."""
  nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  blocking, total = [], []
  manager = Manager(root, max_to_keep=1)
  for step in range(1, repeats + 1):
    jax.block_until_ready(state)
    start = time.perf_counter()
    manager.save(step, state)
    blocking.append(time.perf_counter() - start)
    manager.wait()
    total.append(time.perf_counter() - start)
  manager.close()
  return dict(state_bytes=int(nbytes), blocking_s=float(np.median(blocking)),
              total_s=float(np.median(total)),
              blocking_fraction=float(np.median(blocking) / np.median(total)), repeats=repeats)
