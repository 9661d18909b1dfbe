"""`ftjax plot`: a run's train/eval loss and learning rate against steps, as a PNG."""

from __future__ import annotations

import os

from ftjax import metrics


def read_metrics(workdir: str) -> list[dict]:
  """The rows of `workdir/metrics.jsonl` (a resumed run's repeated steps: the last row wins)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no metrics to plot (is {workdir!r} an ftjax run directory?)')
  rows: dict[tuple[int, tuple[str, ...]], dict] = {}
  for row in metrics.read_rows(path):
    rows[(row['step'], tuple(sorted(row)))] = row
  return [rows[k] for k in sorted(rows)]


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
  points = [(r['step'], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
  return [s for s, _ in points], [v for _, v in points]


def plot(workdir: str, out: str | None = None) -> str:
  """Writes the plot to `out` (default `workdir/metrics.png`) and returns its path."""
  import matplotlib

  matplotlib.use('Agg')  # files only: no display on servers
  from matplotlib import pyplot as plt

  rows = read_metrics(workdir)
  out = out or os.path.join(workdir, 'metrics.png')
  fig, (loss_ax, lr_ax) = plt.subplots(2, 1, figsize=(8, 6), sharex=True,
                                       gridspec_kw=dict(height_ratios=(2, 1)))
  plotted = False
  for key, style in (('loss', '-'), ('eval_loss', 'o-')):
    steps, values = _series(rows, key)
    if steps:
      loss_ax.plot(steps, values, style, label=key.replace('_', ' '), markersize=4)
      plotted = True
  if not plotted:
    plt.close(fig)
    raise ValueError(f'{workdir}/metrics.jsonl has no loss or eval_loss values yet')
  loss_ax.set_ylabel('loss')
  loss_ax.set_yscale('log')
  loss_ax.grid(True, which='both', alpha=0.3)
  loss_ax.legend()
  loss_ax.set_title(os.path.basename(os.path.abspath(workdir)))
  steps, values = _series(rows, 'learning_rate')
  lr_ax.plot(steps, values, color='tab:green')
  lr_ax.set_ylabel('learning rate')
  lr_ax.set_xlabel('step')
  lr_ax.grid(True, alpha=0.3)
  fig.tight_layout()
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return out
