"""Run outputs on process 0: metrics.jsonl, TensorBoard events, a progress bar, optionally W&B."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from typing import Any

import jax
import tqdm


def _summary_writer(logdir: str) -> Any:
  """A tensorboardX SummaryWriter, imported without PyTorch.

  tensorboardX imports torch when it is installed (only to accept torch tensors); in a JAX run
  that costs about 240 MB of resident memory and a second of start-up for nothing. A torch the
  process already imported is left alone.
  """
  blocked = 'torch' not in sys.modules
  if blocked:
    sys.modules['torch'] = None  # `import torch` raises ImportError while tensorboardX loads
  try:
    from tensorboardX import SummaryWriter
  finally:
    if blocked and sys.modules.get('torch', 0) is None:
      del sys.modules['torch']
  return SummaryWriter(logdir)


def _plain(value: Any) -> Any:
  value = value.item() if hasattr(value, 'item') else value
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN/inf; keep them visible as strings
  return value


def read_rows(path: str) -> list[dict[str, Any]]:
  """The rows of a metrics.jsonl; a torn line (a writer killed mid-line) is skipped, with a
  warning naming it."""
  rows = []
  with open(path, encoding='utf-8', errors='replace') as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        logging.warning('%s:%d: ignoring a torn or malformed line', path, lineno)
        continue
      if isinstance(row, dict) and isinstance(row.get('step'), int):
        rows.append(row)
  return rows


def _end_torn_line(path: str) -> None:
  """Starts appends on a fresh line when the last one was cut off (its fragment stays, and
  readers skip it)."""
  if not os.path.isfile(path) or not os.path.getsize(path):
    return
  with open(path, 'rb') as f:
    f.seek(-1, os.SEEK_END)
    torn = f.read(1) != b'\n'
  if torn:
    logging.warning('%s: the last line was cut off (a killed run); it is ignored', path)
    with open(path, 'ab') as f:
      f.write(b'\n')


class Writer:
  """Writes metrics to `workdir/metrics.jsonl` and `workdir/tensorboard/` on process 0 only.

  With `wandb_project`, also to Weights & Biases (imported only then; `WANDB_MODE=offline`
  writes under `workdir/wandb` without a network). Numbers are scalars; a list of dicts
  (sample completions) becomes a text table.
  """

  def __init__(self, workdir: str, *, total_steps: int, start_step: int = 0, progress: bool = True,
               wandb_project: str = '', config: dict[str, Any] | None = None):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._jsonl = self._tb = self._bar = self._wandb = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    _end_torn_line(self.path)
    self._jsonl = open(self.path, 'a', encoding='utf-8')  # noqa: SIM115 (closed in close())
    self._tb = _summary_writer(os.path.join(workdir, 'tensorboard'))
    if wandb_project:
      import wandb

      # The run id comes from the workdir's path, so a resumed run continues the same W&B run.
      self._wandb = wandb.init(project=wandb_project, dir=workdir, config=config,
                               name=os.path.basename(os.path.abspath(workdir)),
                               id=_wandb_id(workdir), resume='allow')
    if progress:
      self._bar = tqdm.tqdm(total=total_steps, initial=start_step, unit='step', file=sys.stderr,
                            dynamic_ncols=True)

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    """Appends one JSON line `{"step": step, **metrics}` and the matching scalars."""
    if not self.enabled:
      return
    row = {'step': int(step), **{k: _plain(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(row) + '\n')
    self._jsonl.flush()
    for key, value in row.items():
      if key != 'step' and isinstance(value, (int, float)):
        self._tb.add_scalar(key, value, int(step))
      elif isinstance(value, list) and value and isinstance(value[0], dict):
        self._tb.add_text(key, _markdown_table(value), int(step))
    if self._wandb is not None:
      self._wandb.log({k: _wandb_value(v) for k, v in row.items() if k != 'step'},
                      step=int(step))
    if self._bar is not None and 'loss' in row:
      self._bar.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)

  def advance(self, steps: int = 1) -> None:
    if self._bar is not None:
      self._bar.update(steps)

  def print(self, line: str) -> None:
    """A line on process 0's terminal that does not break the progress bar."""
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.write(line, file=sys.stdout)
    else:
      print(line, flush=True)

  def close(self) -> None:
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.close()
    self._tb.close()
    self._jsonl.close()
    if self._wandb is not None:
      self._wandb.finish()


def _markdown_table(rows: list[dict[str, Any]]) -> str:
  keys = list(rows[0])
  cell = lambda v: str(v).replace('|', '\\|').replace('\n', '<br>')
  lines = ['| ' + ' | '.join(keys) + ' |', '|' + ' --- |' * len(keys)]
  return '\n'.join(lines + ['| ' + ' | '.join(cell(r.get(k, '')) for k in keys) + ' |'
                             for r in rows])


def _wandb_value(value: Any) -> Any:
  if isinstance(value, list) and value and isinstance(value[0], dict):
    import wandb

    keys = list(value[0])
    return wandb.Table(columns=keys, data=[[str(r.get(k, '')) for k in keys] for r in value])
  return value


def _wandb_id(workdir: str) -> str:
  import hashlib

  return hashlib.sha1(os.path.abspath(workdir).encode()).hexdigest()[:16]
