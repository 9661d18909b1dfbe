"""The run directory: one live run per workdir, and nothing written there before a run is valid.

A run holds an OS lock (`flock`) on its workdir for as long as it lives, so a second
`ftjax train` on the same workdir is refused with the holder's pid and host, and a crashed
run never leaves the lock stuck (the kernel drops it with the process). The checks that can
refuse a run (a workdir that is a file or read-only, `ckpt.resume=never` over checkpoints)
read only; `commit` is the first call that writes, after the config, the mesh, the data and
the restore have all passed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import tempfile
import time
from typing import Any

import jax

from ftjax.errors import UserError

LOCK_INFO = 'ftjax.lock'  # who holds the lock (pid, host, start time); informative only
OUTPUTS = ('checkpoints', 'checkpoints_corrupt', 'metrics.jsonl', 'tensorboard', 'config.json',
           'wandb')


class WorkdirError(UserError):
  """The run directory cannot be used as asked (the message says why and what to do)."""


def has_checkpoints(workdir: str) -> list[int]:
  root = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(root):
    return []
  return sorted(int(d) for d in os.listdir(root) if d.isdigit())


class RunDir:
  """The workdir of one `ftjax train`: checked and locked on creation, written by `commit`."""

  def __init__(self, workdir: str, *, resume: str, overwrite: bool):
    self.path = os.path.abspath(workdir)
    self.overwrite = overwrite
    self._fd: int | None = None
    self._primary = jax.process_index() == 0
    if os.path.exists(self.path) and not os.path.isdir(self.path):
      raise WorkdirError(f'--workdir={workdir!r} is a file, not a directory')
    if self._primary:
      _check_writable(workdir, self.path)
    if os.path.isdir(self.path):
      self._lock()
    steps = has_checkpoints(self.path)
    if resume == 'never' and steps and not overwrite:
      self.release()
      raise WorkdirError(
          f'--workdir={workdir!r} already holds checkpoints (steps {steps}); ckpt.resume=never '
          'would mix two runs there: pass --config.ckpt.overwrite=True to replace them, or use '
          'another --workdir')

  def _lock(self) -> None:
    if not self._primary or self._fd is not None:
      return
    fd = os.open(self.path, os.O_RDONLY)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      raise WorkdirError(f'--workdir={self.path!r} is in use by another run '
                         f'({_holder(self.path)}); wait for it to finish or use another '
                         '--workdir') from None
    self._fd = fd

  def commit(self) -> None:
    """Creates and locks the workdir, records the holder, and with `overwrite` removes the
    outputs of the run that was there before."""
    if not self._primary:
      return
    os.makedirs(self.path, exist_ok=True)
    self._lock()
    if self.overwrite:
      for name in OUTPUTS:
        target = os.path.join(self.path, name)
        if os.path.isdir(target):
          shutil.rmtree(target)
        elif os.path.exists(target):
          os.remove(target)
    write_json(os.path.join(self.path, LOCK_INFO),
               dict(pid=os.getpid(), host=socket.gethostname(), since=time.strftime('%FT%T%z')))

  def release(self) -> None:
    if self._fd is None:
      return
    with contextlib.suppress(OSError):
      os.remove(os.path.join(self.path, LOCK_INFO))
    os.close(self._fd)
    self._fd = None


def _check_writable(flag: str, path: str) -> None:
  """Tries a write where the run will write (os.access says yes to root on read-only places)."""
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  try:
    fd, probe = tempfile.mkstemp(prefix='.ftjax-probe-', dir=existing)
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise WorkdirError(f'--workdir={flag!r}: cannot write in {existing!r} '
                       f'({e.strerror or e})') from None


def _holder(path: str) -> str:
  try:
    with open(os.path.join(path, LOCK_INFO)) as f:
      info = json.load(f)
    return f"pid {info['pid']} on {info['host']} since {info['since']}"
  except (OSError, ValueError, KeyError):
    return 'a process that has not written its pid yet'


def write_json(path: str, payload: Any) -> None:
  """Writes JSON atomically: a crash leaves the old file or the new one, never half of one."""
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(payload, f, indent=2)
  os.replace(tmp, path)


def flat(tree: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  """`{'optim': {'lr': 1}}` -> `{'optim.lr': 1}`."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flat(value, f'{prefix}{key}.'))
    else:
      out[prefix + key] = value
  return out


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
  """One line per key whose value differs between a checkpoint's config and this run's."""
  # JSON gives lists where the live config holds tuples (mesh.shape): compare them as lists.
  plain = lambda v: list(v) if isinstance(v, (list, tuple)) else v
  before, after = flat(saved), flat(current)
  lines = []
  for key in sorted(set(before) | set(after)):
    old, new = plain(before.get(key, '<unset>')), plain(after.get(key, '<unset>'))
    if old != new:
      lines.append(f'resume: {key} changed since the checkpoint: {old!r} -> {new!r}')
  return lines
