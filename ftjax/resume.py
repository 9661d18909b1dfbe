"""Where a run starts and how it stops early: the newest intact checkpoint, what changed since.

Restores walk the checkpoints newest first: one whose files are missing, truncated or fail
their checksums is named and skipped (the next older intact one is used), and one that does
not fit the model stops the run. SIGTERM (schedulers, TPU maintenance) and the first Ctrl-C
are preemptions: the loop saves after the current step and exits 75; a second Ctrl-C aborts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import jax

from ftjax import checkpoint, data, workdir
from ftjax import config as config_lib

EXIT_RESTART = 75  # EX_TEMPFAIL: preempted after a committed save; run the command again


class Preempted(Exception):  # noqa: N818 (a signal, not an error)
  """Raised inside a blocked data read when a preemption signal arrives."""


class Preemption:
  """SIGTERM and SIGINT ask the loop to save and stop.

  One process: our handlers set a flag (and, while the loop waits for data that may never
  come, raise `Preempted` there). Several: JAX's preemption sync point (via Orbax) makes
  every host agree on the same step for SIGTERM.
  """

  def __init__(self, say: Callable[[str], None] = print):
    self.requested = False
    self.say, self._interrupts, self._waiting = say, 0, False
    self._previous: dict[int, Any] = {}
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGTERM, signal.SIGINT):
        self._previous[signum] = signal.signal(signum, self._handle)

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT:
      self._interrupts += 1
      if self._interrupts > 1:
        raise KeyboardInterrupt  # the second Ctrl-C: abort now, nothing saved
      self.say('interrupted: saving a checkpoint after this step, then exiting 75 '
                '(Ctrl-C again aborts without saving)')
    self.requested = True
    if self._waiting:
      raise Preempted

  @contextlib.contextmanager
  def waiting_for_data(self) -> Iterator[None]:
    """While inside, a preemption signal interrupts the read (a stuck pipeline cannot hold
    the run past SIGTERM)."""
    if self.requested:
      raise Preempted
    self._waiting = True
    try:
      yield
    finally:
      self._waiting = False

  def reached(self, step: int, manager: checkpoint.Manager) -> bool:
    if jax.process_count() > 1:
      return manager.reached_preemption(step)
    return self.requested

  def close(self) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}


@dataclasses.dataclass
class Start:
  """What `restore_or_start` found: the manager to save with and the step to go on from."""

  manager: checkpoint.Manager
  step: int = 0
  corrupt: list[tuple[int, str]] = dataclasses.field(default_factory=list)
  notes: list[str] = dataclasses.field(default_factory=list)  # lines to print at start-up


def _manager(r: config_lib.Resolved, run_dir: str) -> checkpoint.Manager:
  c = r.ckpt
  return checkpoint.Manager(checkpoint.directory(run_dir), every_steps=c.every_steps,
                            every_minutes=c.every_minutes, max_to_keep=c.max_to_keep or None,
                            keep_period=c.keep_period or None, async_save=c.async_save)


def restore_or_start(r: config_lib.Resolved, run_dir: str, trainer: Any,
                     train_iter: data.TrainData) -> Start:
  """The run's checkpoint manager, and the newest intact checkpoint restored into `trainer`.

  Reads only: corrupt checkpoints are reported in `Start.corrupt` for the caller to move
  aside once the run is known to be valid.
  """
  manager = _manager(r, run_dir)
  if r.ckpt.resume == 'never':
    return Start(manager)
  if r.ckpt.resume == 'auto':
    source, candidates = manager, manager.all_steps()[::-1]
  else:
    root, step = checkpoint.find_step_dir(r.ckpt.resume)
    source = checkpoint.Manager(root, max_to_keep=None)
    candidates = [step] if step != source.latest_step() else source.all_steps()[::-1]
  if not candidates:
    return Start(manager)
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), trainer.state)
  start = Start(manager)
  try:
    for step in candidates:
      problem = source.verify(step)
      if problem is None:
        try:
          trainer.state = source.restore(step, abstract, train_iter.iterator)
        except checkpoint.CorruptCheckpoint as e:
          problem = str(e)
        except checkpoint.CheckpointError:
          raise  # intact but not this model: refuse, do not fall back
        except Exception as e:  # noqa: BLE001 (TensorStore/Orbax raise many types for bad files)
          problem = _first_line(e)
      if problem is not None:
        start.corrupt.append((step, problem))
        continue
      start.step = step
      break
    else:
      found = '; '.join(f'step {s}: {p}' for s, p in start.corrupt)
      raise checkpoint.CheckpointError(
          f'no intact checkpoint in {source.root} ({found}); move them away, or start over with '
          '--config.ckpt.resume=never --config.ckpt.overwrite=True')
  except BaseException:
    manager.close()  # no background threads left behind by a failed start
    raise
  for step, problem in start.corrupt:
    start.notes.append(f'checkpoint {step} is damaged ({problem}); it will be moved to '
                       f'checkpoints_corrupt/ and the run resumes from step {start.step}')
  saved_config = source.metadata(start.step).get('config') or {}
  start.notes += workdir.config_changes(saved_config, r.config)
  _keep_data_position(saved_config, r.data, train_iter, start)
  newer = [s for s in manager.all_steps() if s > start.step and s not in dict(start.corrupt)]
  if newer:
    start.notes.append(f'resuming from step {start.step}: the newer checkpoints {newer} will be '
                       'replaced when this run saves')
  logging.info('restored step %d from %s', start.step, source.root)
  return start


def _first_line(e: Exception) -> str:
  text = str(e).strip()
  return f'{type(e).__name__}: {text.splitlines()[0][:200]}' if text else type(e).__name__


def _keep_data_position(saved: dict[str, Any], c_data: config_lib.Data, train_iter: data.TrainData,
                        start: Start) -> None:
  """A changed global batch keeps the position in records, not in batches."""
  before = (saved.get('data') or {}).get('global_batch')
  after = c_data.global_batch
  if not before or before == after or not isinstance(train_iter, data.TrainData):
    return
  state = train_iter.get_state()
  if c_data.pack or set(state) != {'next_index'}:
    start.notes.append(f'data.global_batch changed {before} -> {after} on packed data: the '
                       'position is kept at the start of the packing round in progress, so a '
                       'few documents may be seen twice')
    return
  records = state['next_index'] * before
  next_index, rest = divmod(records, after)
  train_iter.set_state({**state, 'next_index': next_index})
  start.notes.append(f'data.global_batch changed {before} -> {after}: the data position stays at '
                     f'record {records} of the stream (batch {next_index}'
                     + (f'; {rest} records of a partial batch are seen again)' if rest else ')'))
