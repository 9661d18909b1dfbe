"""grain pipelines: sources -> host shard -> shuffle -> encode -> mix -> pack -> batch -> mesh.

Each process reads a disjoint slice of every source (`ds[index::count]`), so hosts never see
the same example; each source is reshuffled every epoch; sources are mixed by weight; documents
are packed into fixed-length rows (segment ids + per-document positions) or padded one per row.
The returned iterator has grain's `get_state`/`set_state`, so a resumed run sees exactly the
batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
from collections.abc import Iterator
from typing import Any

import grain
import jax
import numpy as np
from grain.experimental import FirstFitPackIterDataset
from jax.sharding import NamedSharding

from ftjax.data import filters
from ftjax.data.formats import FORMATS, EncodeDoc, Encoder
from ftjax.data.sources import DataError, open_source

FIELDS = ('tokens', 'targets', 'loss_mask', 'positions', 'segment_ids')
DOC_FIELDS = ('tokens', 'targets', 'loss_mask')


@dataclasses.dataclass(frozen=True)
class Source:
  """One entry of `data.sources`."""

  path: str
  weight: float = 1.0
  format: str = 'auto'
  split: str = ''

  @classmethod
  def parse(cls, entry: Any, key: str) -> Source:
    entry = dict(entry) if not isinstance(entry, str) else {'path': entry}
    unknown = sorted(set(entry) - {f.name for f in dataclasses.fields(cls)})
    if unknown or 'path' not in entry:
      raise DataError(f'{key}: each source is {{"path", "weight", "format", "split"}}; got '
                      f'{sorted(entry)}')
    source = cls(**entry)
    if source.format not in FORMATS:
      raise DataError(f'{key}: format={source.format!r} is not one of {FORMATS}')
    if source.weight <= 0:
      raise DataError(f'{key}: weight={source.weight} must be > 0')
    return source


@dataclasses.dataclass(frozen=True)
class Options:
  """How records become rows (the `data` config section, unpacked)."""

  tokenizer: str
  seq_len: int
  train_on: str = 'assistant'
  chat_template: str = ''
  on_bad_record: str = 'error'
  on_too_long: str = 'truncate'
  tfds_data_dir: str = ''
  pairs: bool = False  # preference pairs (objective.kind != sft): one pair per row
  dedup: str = 'none'  # none | exact | near: duplicates of an earlier record are not read
  drop_contradictions: bool = False  # records of a prompt with differing answers are not read
  decontaminate: tuple[str, ...] = ()  # held-out files: records sharing a 13-gram are not read

  def encode_doc(self, fmt: str) -> EncodeDoc:
    encoder = Encoder(self.tokenizer, fmt=fmt, train_on=self.train_on,
                      chat_template=self.chat_template)
    return EncodeDoc(encoder, self.seq_len, self.on_bad_record, self.on_too_long, self.pairs)


class SkipCounter:
  """A grain filter that drops skip markers, counts them per reason, and stops a hopeless run.

  When every record is skipped, packing would filter forever and unpadded rows would be all
  padding forever; so more than `limit` skips in a row, with no usable document between them,
  raise DataError naming the reasons.
  """

  def __init__(self, limit: int = 1000):
    self.counts: collections.Counter[str] = collections.Counter()
    self.limit = limit
    self._run: collections.Counter[str] = collections.Counter()  # reasons since the last doc
    self._run_length = 0

  def __call__(self, doc: dict[str, Any]) -> bool:
    if 'skip' not in doc:
      if self._run_length:
        self._run.clear()
        self._run_length = 0
      return True
    self.counts[doc['skip']] += 1
    self._run[doc['skip']] += 1
    self._run_length += 1
    if self._run_length > self.limit:
      reasons = ', '.join(f'{k}: {n}' for k, n in self._run.most_common())
      raise DataError(f'data: the last {self._run_length} records were all skipped ({reasons}); '
                      'nothing to train on — check data.seq_len / data.train_on / the file '
                      f"(last skipped: {doc['where']})")
    return False


@dataclasses.dataclass(frozen=True)
class PadRow(grain.transforms.Map):
  """One document per row, padded to `seq_len` (segment id 0 marks padding).

  A skipped record becomes an all-padding row (no loss), counted in `skipped`, so that row
  positions, and with them every host's share of a global batch, never shift. `skipped` sees
  every document, so that a run of nothing but skips raises instead of yielding padding forever.
  """

  seq_len: int
  skipped: SkipCounter | None = None

  def map(self, doc: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    row = {k: np.zeros(self.seq_len, np.int32) for k in FIELDS}
    if self.skipped is not None:
      self.skipped(doc)
    if 'skip' in doc:
      return row
    n = len(doc['tokens'])
    for k in DOC_FIELDS:
      row[k][:n] = doc[k]
    if 'segment_ids' in doc:  # a preference pair: two segments with their own positions
      row['positions'][:n], row['segment_ids'][:n] = doc['positions'], doc['segment_ids']
    else:
      row['positions'][:n] = np.arange(n)
      row['segment_ids'][:n] = 1
    return row


def _from_packed(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  out = {k: row[k].astype(np.int32) for k in DOC_FIELDS}
  out['positions'] = row['tokens_positions'].astype(np.int32)
  out['segment_ids'] = row['tokens_segment_ids'].astype(np.int32)
  return out


def _shard() -> tuple[int, int]:
  return jax.process_index(), jax.process_count()


def local_batch_size(global_batch: int, shard_count: int) -> int:
  if global_batch % shard_count:
    raise DataError(f'data.global_batch={global_batch} is not divisible by the {shard_count} '
                    'processes')
  return global_batch // shard_count


def _mixture(sources: list[Source], options: Options, *,
             seed: int) -> tuple[grain.MapDataset, int, dict[str, int]]:
  """The endless mixture of encoded documents, the record count of one pass over `sources`, and
  the records the filters (`data.dedup`, ...) dropped, by reason."""
  mixed, records = [], 0
  kept = filters.keep(sources, options)
  for i, source in enumerate(sources):
    ds = open_source(source.path, split=source.split, tfds_data_dir=options.tfds_data_dir)
    if kept is not None:  # before the shuffle: positions index the kept records
      ds = grain.MapDataset.source(kept.indices[i]).map(ds.__getitem__)
    if len(ds) == 0:
      raise DataError(f'{source.path}: no records' + (
          f' left after the filters (dropped: {kept.dropped})' if kept is not None else ''))
    records += len(ds)
    ds = ds.shuffle(seed=seed + 7919 * i).repeat()  # a new order every epoch
    mixed.append(ds.map(options.encode_doc(source.format)))
  dropped = kept.dropped if kept is not None else {}
  if len(mixed) == 1:
    return mixed[0], records, dropped
  return grain.MapDataset.mix(mixed, weights=[s.weight for s in sources]), records, dropped


def documents(sources: list[Source], options: Options, *, seed: int) -> grain.MapDataset:
  """The endless, weighted mixture of encoded documents (or skip markers), the same on every
  host: hosts then take disjoint positions of it, and encode only those (grain is lazy)."""
  return _mixture(sources, options, seed=seed)[0]


@dataclasses.dataclass
class TrainData:
  """This host's batches, the skip counts, and what checkpoints save of it."""

  iterator: grain.DatasetIterator
  skipped: SkipCounter
  filtered: dict[str, int] = dataclasses.field(default_factory=dict)  # dropped, by reason

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self.iterator)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def get_state(self) -> dict[str, Any]:
    return self.iterator.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self.iterator.set_state(state)


def train_batches(sources: list[Source], options: Options, *, global_batch: int, seed: int,
                  pack: bool = True, workers: int = 0,
                  shard: tuple[int, int] | None = None) -> TrainData:
  """This host's share of every global batch, endlessly, with resumable state.

  Unpacked: host i takes rows [i*local, (i+1)*local) of every global batch, so the global
  batches (and a checkpointed position) are the same for any number of processes. Packed: host i
  packs documents i, i+n, i+2n, ... of the shared stream, so hosts never share a document.
  Iterating raises DataError once more records in a row than max(1000, one pass over every
  source) were skipped (also from grain workers: their exception reaches the caller).
  """
  index, count = shard or _shard()
  local = local_batch_size(global_batch, count)
  docs, records, dropped = _mixture(sources, options, seed=seed)
  # More skips in a row than a whole pass over the data holds means nothing usable is left.
  skipped = SkipCounter(limit=max(1000, records))
  if pack:
    mine = docs[index::count].to_iter_dataset().filter(skipped)
    rows = FirstFitPackIterDataset(
        mine, length_struct=dict.fromkeys(DOC_FIELDS, options.seq_len),
        num_packing_bins=max(local, 8), seed=seed, shuffle_bins=True).map(_from_packed)
    batches = rows.batch(local, drop_remainder=True)
  else:
    rows = docs.map(PadRow(options.seq_len, skipped))
    batches = rows.batch(local, drop_remainder=True)[index::count].to_iter_dataset()
  if workers:
    batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return TrainData(iter(batches), skipped, dropped)


def eval_batches(sources: list[Source], options: Options, *, global_batch: int,
                 max_examples: int = -1,
                 shard: tuple[int, int] | None = None) -> list[dict[str, np.ndarray]]:
  """Every held-out example once, one per row, in this host's batches (equal count per host)."""
  index, count = shard or _shard()
  local = local_batch_size(global_batch, count)
  items = []
  for source in sources:
    ds = open_source(source.path, split=source.split, tfds_data_dir=options.tfds_data_dir)
    encode = options.encode_doc(source.format)
    items += [(encode, ds[i]) for i in range(len(ds))]
  if max_examples > 0:
    items = items[:max_examples]
  per_host = math.ceil(len(items) / count)
  pad = PadRow(options.seq_len)
  rows = [encode.map(item) for encode, item in items[index::count]]
  rows = [pad.map(r) for r in rows if 'skip' not in r]
  empty = {k: np.zeros(options.seq_len, np.int32) for k in FIELDS}
  rows += [empty] * (math.ceil(per_host / local) * local - len(rows))
  return [{k: np.stack([r[k] for r in rows[i:i + local]]) for k in FIELDS}
          for i in range(0, len(rows), local)]


def to_global(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Assembles each host's rows into one global batch laid out on the mesh."""
  global_rows = local['tokens'].shape[0] * jax.process_count()

  def one(x):
    return jax.make_array_from_process_local_data(sharding, x, (global_rows, *x.shape[1:]))

  return {k: one(local[k]) for k in FIELDS}


def global_rows(rows: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """Rows every host holds whole, in global row order, laid out on the mesh as a batch is (each
  device takes its own rows)."""
  return jax.make_array_from_callback(rows.shape, sharding, lambda index: rows[index])


def device_batches(batches: Iterator[dict[str, np.ndarray]],
                   sharding: NamedSharding) -> Iterator[tuple[dict[str, jax.Array], int]]:
  """Global batches with the count of real (non-pad) tokens in this host's rows."""
  for local in batches:
    yield to_global(local, sharding), int(np.count_nonzero(local['segment_ids']))


class Prefetcher:
  """Global batches put on the devices `depth` steps ahead of the loop that consumes them.

  The transfers of the next batches overlap the running step. Checkpoints save this object's
  state, which is the data iterator's state right after the batch last *consumed* (not the
  prefetched ones), so a resumed run sees exactly the batches an uninterrupted one would.
  """

  def __init__(self, data: TrainData, sharding: NamedSharding, depth: int = 2):
    self._data, self._sharding = data, sharding
    self._queue: collections.deque = collections.deque()
    self._consumed_state = data.get_state()
    self._depth = max(depth, 1)

  def _fill(self) -> None:
    while len(self._queue) < self._depth:
      local = next(self._data)
      self._queue.append((to_global(local, self._sharding), local['segment_ids'],
                          self._data.get_state()))

  def __next__(self) -> tuple[dict[str, jax.Array], np.ndarray]:
    """The next global batch and this host's `[rows, T]` segment ids (0 = padding)."""
    self._fill()
    batch, segment_ids, state = self._queue.popleft()
    try:
      self._fill()  # start the next transfers before the step is dispatched
    except BaseException:
      # Interrupted (a preemption during a stuck read): this batch was not trained on, so the
      # consumed position must not move past it.
      self._queue.appendleft((batch, segment_ids, state))
      raise
    self._consumed_state = state
    return batch, segment_ids

  def __iter__(self) -> Iterator[tuple[dict[str, jax.Array], np.ndarray]]:
    return self

  def saveable(self, step: int) -> bool:
    """Whether a checkpoint after `step` resumes exactly (always, for data read ahead)."""
    return True

  def get_state(self) -> bytes:
    """What grain's checkpoint handler writes (JSON, as for the iterator itself)."""
    return json.dumps(self._consumed_state, indent=4).encode()
