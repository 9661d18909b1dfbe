"""Which training records a run reads: `data.dedup` (none | exact | near),
`data.drop_contradictions` and `data.decontaminate`, decided once over the whole mixture before
any shuffling.

The decision is a pure function of the files and these settings (sources in config order,
records in file order, the first of a duplicate group kept), so every host computes the same
kept set, the pipeline's positions index into it, and a checkpointed data position resumes
exactly. Records that cannot be parsed are left in: the pipeline skips or stops on them as
before, naming them.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import numpy as np

from ftjax.data import dedup, formats
from ftjax.data.sources import BadRecord, open_records, parse

DEDUP = ('none', 'exact', 'near')
REASONS = ('duplicate', 'near_duplicate', 'contradiction', 'contaminated')


@dataclasses.dataclass(frozen=True)
class Kept:
  """Per source, the indices of the records kept (ascending), and the dropped counts."""

  indices: tuple[np.ndarray, ...]
  dropped: dict[str, int]


def active(options: Any) -> bool:
  return options.dedup != 'none' or options.drop_contradictions or bool(options.decontaminate)


def _parts(item: dict[str, Any], fmt: str) -> tuple[str, str] | None:
  try:
    record = parse(item['raw'])
    if not isinstance(record, dict):
      return None
    return dedup.parts(record, formats.detect(record) if fmt == 'auto' else fmt)
  except BadRecord:
    return None


def held_out_texts(path: str, options: Any) -> list[tuple[str, str]]:
  """(where, prompt + answer) of each usable record of a held-out file (bad ones are skipped:
  they cannot leak)."""
  out = []
  records = open_records(path, tfds_data_dir=options.tfds_data_dir)
  for i in range(len(records)):
    parts = _parts(records[i], 'auto')
    if parts is not None:
      out.append((records[i]['where'], f'{parts[0]} {parts[1]}'))
  return out


def keep(sources: list[Any], options: Any) -> Kept | None:
  """The records `options` (`data.Options`) keep of `sources`; None when no filter is on."""
  if not active(options):
    return None
  held = dedup.HeldOut([text for path in options.decontaminate
                        for _, text in held_out_texts(path, options)])
  deduper = dedup.Deduper()
  ids: list[tuple[int, int]] = []  # (source, record) of each record the deduper saw
  drop: dict[tuple[int, int], str] = {}
  sizes = []
  for s, source in enumerate(sources):
    records = open_records(source.path, split=source.split, tfds_data_dir=options.tfds_data_dir)
    sizes.append(len(records))
    for r in range(len(records)):
      parts = _parts(records[r], source.format)
      if parts is None:
        continue
      repeats = deduper.add(*parts) is not None
      ids.append((s, r))
      if repeats and options.dedup != 'none':
        drop[(s, r)] = 'duplicate'
      elif held.mark(f'{parts[0]} {parts[1]}'):
        drop[(s, r)] = 'contaminated'
  if options.dedup == 'near':
    for k in deduper.near():
      drop[ids[k]] = 'near_duplicate'
  if options.drop_contradictions:  # which answer is right is unknown: every one goes
    for first, differing in deduper.contradictions():
      for k in (first, *differing):
        drop.setdefault(ids[k], 'contradiction')
  indices = tuple(np.array([r for r in range(n) if (s, r) not in drop], np.int64)
                  for s, n in enumerate(sizes))
  return Kept(indices, dict(collections.Counter(drop.values())))
