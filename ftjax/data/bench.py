"""`ftjax data bench`: tokens/s of the input pipeline alone, without a model."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ftjax.data.pipeline import Options, Source, train_batches


def bench(sources: list[Source], options: Options, *, global_batch: int, seed: int, pack: bool,
          workers: int, batches: int) -> dict[str, Any]:
  """Times the input pipeline alone (no model): tokens/s after one warm-up batch."""
  it = train_batches(sources, options, global_batch=global_batch, seed=seed, pack=pack,
                     workers=workers, shard=(0, 1))
  next(it)  # warm-up: opening files, starting workers
  start = time.perf_counter()
  real = 0
  for _ in range(batches):
    real += int(np.count_nonzero(next(it)['segment_ids']))
  seconds = time.perf_counter() - start
  slots = batches * global_batch * options.seq_len
  return dict(tokens_per_s=real / seconds, rows_per_s=batches * global_batch / seconds,
              batches=batches, seconds=seconds, packing_efficiency=real / slots, pack=pack,
              workers=workers, seq_len=options.seq_len, global_batch=global_batch,
              skipped_records=dict(it.skipped.counts))
