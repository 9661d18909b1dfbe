"""Data sources: JSONL (.gz), JSON arrays, Parquet, ArrayRecord and TFDS, as random-access records.

Every source becomes a `grain.MapDataset` of `{'where': ..., 'raw': ...}` items, where `where`
names the file and line (or index) for error reports and `raw` is a JSON line (parsed later,
so a malformed line is reported, not fatal, under `data.on_bad_record='skip'`) or a dict.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from typing import Any

import grain
import numpy as np
from etils import epath


class DataError(ValueError):
  """A data file is missing or malformed (the message names file and line)."""


def kind_of(path: str) -> str:
  """The file type of a source path: jsonl | json | parquet | array_record | tfds."""
  if path.startswith('tfds://'):
    return 'tfds'
  name = path.lower()
  for suffix, kind in (('.jsonl', 'jsonl'), ('.jsonl.gz', 'jsonl'), ('.ndjson', 'jsonl'),
                       ('.json', 'json'), ('.parquet', 'parquet'),
                       ('.array_record', 'array_record'), ('.arrayrecord', 'array_record')):
    if name.endswith(suffix) or (kind == 'array_record' and suffix + '-' in name):
      return kind
  raise DataError(f'{path}: cannot tell the file type; use .jsonl, .jsonl.gz, .json, .parquet, '
                  '.array_record or tfds://name/split')


def _exists(path: str) -> None:
  if not epath.Path(path).exists():
    raise DataError(f'data file not found: {path!r}')


class _Lines(grain.sources.RandomAccessDataSource):
  """The lines of a JSONL file (decompressed if .gz), each with its line number."""

  def __init__(self, path: str):
    _exists(path)
    data = epath.Path(path).read_bytes()
    if path.endswith('.gz'):
      data = gzip.decompress(data)
    self._path = path
    self._lines = [(i, line) for i, line in enumerate(io.StringIO(data.decode('utf-8')), 1)
                   if line.strip()]

  def __len__(self) -> int:
    return len(self._lines)

  def __getitem__(self, index: int) -> dict[str, Any]:
    lineno, line = self._lines[index]
    return {'where': f'{self._path}:{lineno}', 'raw': line}


class _Records(grain.sources.RandomAccessDataSource):
  """Already-parsed records (JSON array, Parquet) with their index."""

  def __init__(self, path: str, records: list[Any]):
    self._path, self._records = path, records

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {'where': f'{self._path}[{index}]', 'raw': self._records[index]}


class _Wrapped(grain.sources.RandomAccessDataSource):
  """ArrayRecord (JSON bytes per record) or TFDS (feature dicts) behind grain's sources."""

  def __init__(self, path: str, source: Any, decode: Any):
    self._path, self._source, self._decode = path, source, decode

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {'where': f'{self._path}[{index}]', 'raw': self._decode(self._source[index])}


def _plain(value: Any) -> Any:
  """TFDS features as plain Python: bytes -> str, arrays -> lists, recursively."""
  if isinstance(value, bytes):
    return value.decode('utf-8')
  if isinstance(value, np.ndarray):
    return [_plain(v) for v in value.tolist()] if value.dtype == object else value.tolist()
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  return value


def _array_record_json(record: bytes) -> str:
  return record.decode('utf-8')


def open_source(path: str, *, split: str = '', tfds_data_dir: str = '') -> grain.MapDataset:
  """A random-access dataset over one source, typed by its path."""
  kind = kind_of(path)
  if kind == 'jsonl':
    return grain.MapDataset.source(_Lines(path))
  if kind == 'json':
    _exists(path)
    text = epath.Path(path).read_text()
    if not text.lstrip().startswith('['):
      return grain.MapDataset.source(_Lines(path))
    try:
      records = json.loads(text)
    except json.JSONDecodeError as e:
      raise DataError(f'{path}:{e.lineno}: not valid JSON ({e.msg})') from None
    return grain.MapDataset.source(_Records(path, records))
  if kind == 'parquet':
    _exists(path)
    import pyarrow.parquet as pq

    return grain.MapDataset.source(_Records(path, pq.read_table(path).to_pylist()))
  if kind == 'array_record':
    paths = sorted(str(p) for p in epath.Path(path).parent.glob(epath.Path(path).name + '*'))
    if not paths:
      raise DataError(f'data file not found: {path!r}')
    source = grain.sources.ArrayRecordDataSource(paths)
    return grain.MapDataset.source(_Wrapped(path, source, _array_record_json))
  # tfds://name/split, read with tfds.data_source from a prepared data dir (no TensorFlow).
  import tensorflow_datasets as tfds

  name, _, path_split = path[len('tfds://'):].partition('/')
  split = split or path_split or 'train'
  try:
    source = tfds.data_source(name, split=split, data_dir=tfds_data_dir or None,
                              download=False)
  except Exception as e:  # tfds raises many types for a missing/unprepared dataset
    raise DataError(f'{path}: cannot open TFDS dataset {name!r} split {split!r} in '
                    f'data.tfds_data_dir={tfds_data_dir!r} ({type(e).__name__}: {e})') from None
  return grain.MapDataset.source(_Wrapped(path, source, _plain))


def prepare(path: str, out: str, *, split: str = '', tfds_data_dir: str = '') -> int:
  """Converts any source to one ArrayRecord file of JSON records; returns the record count."""
  from array_record.python.array_record_module import ArrayRecordWriter

  ds = open_source(path, split=split, tfds_data_dir=tfds_data_dir)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  writer = ArrayRecordWriter(out, 'group_size:1')
  count = 0
  for item in ds:
    raw = item['raw']
    if isinstance(raw, str):
      try:
        raw = json.loads(raw)
      except json.JSONDecodeError as e:
        writer.close()
        raise DataError(f"{item['where']}: not valid JSON ({e.msg})") from None
    writer.write(json.dumps(raw).encode('utf-8'))
    count += 1
  writer.close()
  return count
