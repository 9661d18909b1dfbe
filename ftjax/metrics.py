"""Run outputs on process 0: metrics.jsonl, TensorBoard events, a progress bar."""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

import jax
import tqdm
from tensorboardX import SummaryWriter


def _plain(value: Any) -> Any:
  value = value.item() if hasattr(value, 'item') else value
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN/inf; keep them visible as strings
  return value


class Writer:
  """Writes metrics to `workdir/metrics.jsonl` and `workdir/tensorboard/` on process 0 only."""

  def __init__(self, workdir: str, *, total_steps: int, start_step: int = 0, progress: bool = True):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._jsonl = self._tb = self._bar = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(self.path, 'a', encoding='utf-8')  # noqa: SIM115 (closed in close())
    self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))
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
