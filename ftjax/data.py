"""Minimal data path: JSONL records -> tokens -> padded rows -> global `jax.Array` batches.

Records are `{"text": ...}` or `{"prompt": ..., "completion": ...}`. Each row holds one
example, shifted for next-token prediction, with segment ids (0 = padding) and positions,
so the model and loss already speak the packed-batch format.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterator
from typing import Any, Literal

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding

from ftjax.tokenizer import Tokenizer

TrainOn = Literal['completion', 'all']
FIELDS = ('tokens', 'targets', 'loss_mask', 'positions', 'segment_ids')


class DataError(ValueError):
  """A data file is missing or malformed (the message names file and line)."""


def read_jsonl(path: str) -> list[dict[str, str]]:
  """Reads and validates every record of a JSONL file."""
  if not os.path.isfile(path):
    raise DataError(f'data file not found: {path!r} (check data.train_path / data.eval_path)')
  records = []
  with open(path, encoding='utf-8') as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f'{path}:{lineno}: not valid JSON ({e.msg})') from None
      if not isinstance(record, dict):
        raise DataError(f'{path}:{lineno}: expected a JSON object, got {type(record).__name__}')
      has_text = 'text' in record
      has_pair = 'prompt' in record and 'completion' in record
      if has_text == has_pair:
        raise DataError(
            f'{path}:{lineno}: expected either a "text" field or "prompt" and "completion" '
            f'fields; found keys {sorted(record)}'
        )
      for key in ('text',) if has_text else ('prompt', 'completion'):
        if not isinstance(record[key], str):
          raise DataError(f'{path}:{lineno}: field {key!r} must be a string')
      records.append(record)
  if not records:
    raise DataError(f'{path}: no records')
  return records


@dataclasses.dataclass(frozen=True)
class EncodeRow(grain.transforms.Map):
  """Tokenizes one record into a padded, shifted row of length `seq_len`."""

  tokenizer: Tokenizer
  seq_len: int
  train_on: TrainOn

  def map(self, record: dict[str, str]) -> dict[str, np.ndarray]:
    tok = self.tokenizer
    bos = [tok.bos_id] if tok.bos_id is not None else []
    if 'text' in record:
      ids = bos + tok.encode(record['text']) + [tok.eos_id]
      weights = [1] * len(ids)
    else:
      prompt = bos + tok.encode(record['prompt'])
      completion = tok.encode(record['completion']) + [tok.eos_id]
      ids = prompt + completion
      weights = [int(self.train_on == 'all')] * len(prompt) + [1] * len(completion)
    ids, weights = ids[: self.seq_len + 1], weights[: self.seq_len + 1]
    n = len(ids) - 1
    row = {k: np.zeros(self.seq_len, np.int32) for k in FIELDS}
    row['tokens'][:] = tok.pad_id
    row['targets'][:] = tok.pad_id
    row['tokens'][:n] = ids[:-1]
    row['targets'][:n] = ids[1:]
    row['loss_mask'][:n] = weights[1:]
    row['positions'][:n] = np.arange(n)
    row['segment_ids'][:n] = 1
    return row


def _local_batch(global_batch: int) -> int:
  if global_batch % jax.process_count():
    raise DataError(
        f'data.global_batch={global_batch} is not divisible by the {jax.process_count()} processes'
    )
  return global_batch // jax.process_count()


def train_batches(
    path: str,
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    global_batch: int,
    seed: int,
    train_on: TrainOn,
) -> grain.DatasetIterator:
  """An endless, shuffled (reshuffled each epoch) iterator of this host's rows.

  Each process reads a disjoint slice of the records. The iterator has
  `get_state`/`set_state`, so a checkpoint can resume it exactly.
  """
  records = read_jsonl(path)
  ds = grain.MapDataset.source(records)[jax.process_index() :: jax.process_count()]
  ds = ds.shuffle(seed=seed).repeat().map(EncodeRow(tokenizer, seq_len, train_on))
  return iter(ds.batch(_local_batch(global_batch), drop_remainder=True).to_iter_dataset())


def eval_batches(
    path: str,
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    global_batch: int,
    train_on: TrainOn,
    max_examples: int,
) -> list[dict[str, np.ndarray]]:
  """Every held-out example exactly once, in this host's padded batches (all hosts equal count)."""
  records = read_jsonl(path)
  if max_examples > 0:
    records = records[:max_examples]
  local_batch = _local_batch(global_batch)
  per_host = math.ceil(len(records) / jax.process_count())
  num_batches = math.ceil(per_host / local_batch)
  mine = records[jax.process_index() :: jax.process_count()]
  encode = EncodeRow(tokenizer, seq_len, train_on)
  rows = [encode.map(r) for r in mine]
  empty = {k: np.zeros(seq_len, np.int32) for k in FIELDS}
  rows += [empty] * (num_batches * local_batch - len(rows))
  return [
      {k: np.stack([r[k] for r in rows[i : i + local_batch]]) for k in FIELDS}
      for i in range(0, len(rows), local_batch)
  ]


def to_global(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Assembles each host's rows into one global batch laid out on the mesh."""
  global_rows = local['tokens'].shape[0] * jax.process_count()

  def one(x):
    return jax.make_array_from_process_local_data(sharding, x, (global_rows, *x.shape[1:]))

  return {k: one(v) for k, v in local.items()}


def device_batches(
    batches: Iterator[dict[str, np.ndarray]], sharding: NamedSharding
) -> Iterator[tuple[dict[str, jax.Array], int]]:
  """Global batches with the count of real (non-pad) tokens in this host's rows."""
  for local in batches:
    yield to_global(local, sharding), int(np.count_nonzero(local['segment_ids']))


def describe(batch: dict[str, Any]) -> str:
  return ', '.join(f'{k}{tuple(v.shape)}' for k, v in batch.items())
