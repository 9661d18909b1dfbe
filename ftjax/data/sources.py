"""Data sources: JSONL (.gz), JSON arrays, Parquet, ArrayRecord and TFDS, as random-access records.

Every source becomes a `grain.MapDataset` of `{'where': ..., 'raw': ...}` items, where `where`
names the file and line (or index) for error reports and `raw` is the undecoded bytes of a JSON
line or record (decoded and parsed later, by `parse`, so a line that is not UTF-8 or not JSON
is one bad record, skipped under `data.on_bad_record='skip'`) or an already-parsed value.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from typing import Any

import grain
import numpy as np
from etils import epath

from ftjax.errors import UserError


class DataError(UserError):
  """A data file is missing or malformed (the message names file and line)."""


class BadRecord(Exception):
  """A record that cannot be used; `reason` is a short key for skip counts."""

  def __init__(self, reason: str, detail: str):
    super().__init__(detail)
    self.reason = reason


def parse(raw: Any) -> Any:
  """A source item's `raw` as a JSON value: bytes are decoded as UTF-8 and text parsed as JSON.

  Raises:
    BadRecord: 'bad_utf8' or 'bad_json', with what is wrong (the caller adds file and line).
  """
  if isinstance(raw, bytes):
    try:
      raw = raw.decode('utf-8')
    except UnicodeDecodeError as e:
      raise BadRecord('bad_utf8', f'not valid UTF-8 ({e.reason}: byte '
                      f'{e.object[e.start:e.start + 1]!r} at column {e.start + 1})') from None
  if isinstance(raw, str):
    try:
      return json.loads(raw)
    except json.JSONDecodeError as e:
      raise BadRecord('bad_json', f'not valid JSON ({e.msg})') from None
  return raw


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


def _read_bytes(path: str) -> bytes:
  """The file's bytes, decompressed if .gz."""
  _exists(path)
  data = epath.Path(path).read_bytes()
  if path.endswith('.gz'):
    try:
      data = gzip.decompress(data)
    except (EOFError, OSError, zlib.error) as e:  # truncated: EOFError; corrupt: BadGzipFile
      raise DataError(f'{path}: truncated or corrupt gzip file ({type(e).__name__}: {e})') from None
  return data


class _Lines(grain.sources.RandomAccessDataSource):
  """The non-blank lines of a JSONL file (decompressed if .gz), each with its line number.

  Lines stay bytes until parsed, so one line that is not UTF-8 is one bad record, not a failure
  to open the whole file.
  """

  def __init__(self, path: str, data: bytes | None = None):
    data = _read_bytes(path) if data is None else data
    self._path = path
    self._lines = [(i, line) for i, line in enumerate(data.split(b'\n'), 1) if line.strip()]

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


def open_source(path: str, *, split: str = '', tfds_data_dir: str = '') -> grain.MapDataset:
  """A random-access dataset over one source, typed by its path."""
  return grain.MapDataset.source(open_records(path, split=split, tfds_data_dir=tfds_data_dir))


def open_records(path: str, *, split: str = '',
                 tfds_data_dir: str = '') -> grain.sources.RandomAccessDataSource:
  """The records of one source, typed by its path, as a plain random-access source (what
  `open_source` wraps; a whole-file scan reads it without grain's per-element overhead)."""
  kind = kind_of(path)
  if kind == 'jsonl':
    return _Lines(path)
  if kind == 'json':
    data = _read_bytes(path)
    if not data.lstrip().startswith(b'['):
      return _Lines(path, data)
    try:
      text = data.decode('utf-8')
    except UnicodeDecodeError as e:
      line = data.count(b'\n', 0, e.start) + 1
      raise DataError(f'{path}:{line}: not valid UTF-8 ({e.reason})') from None
    try:
      records = json.loads(text)
    except json.JSONDecodeError as e:
      raise DataError(f'{path}:{e.lineno}: not valid JSON ({e.msg})') from None
    return _Records(path, records)
  if kind == 'parquet':
    _exists(path)
    import pyarrow.parquet as pq

    return _Records(path, pq.read_table(path).to_pylist())
  if kind == 'array_record':
    paths = sorted(str(p) for p in epath.Path(path).parent.glob(epath.Path(path).name + '*'))
    if not paths:
      raise DataError(f'data file not found: {path!r}')
    source = grain.sources.ArrayRecordDataSource(paths)
    return _Wrapped(path, source, bytes)  # JSON bytes, parsed later
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
  return _Wrapped(path, source, _plain)


def prepare(path: str, out: str, *, split: str = '', tfds_data_dir: str = '') -> int:
  """Converts any source to one ArrayRecord file of JSON records; returns the record count."""
  from array_record.python.array_record_module import ArrayRecordWriter

  ds = open_source(path, split=split, tfds_data_dir=tfds_data_dir)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  writer = ArrayRecordWriter(out, 'group_size:1')
  count = 0
  for item in ds:
    try:
      raw = parse(item['raw'])
    except BadRecord as e:
      writer.close()
      raise DataError(f"{item['where']}: {e}") from None
    writer.write(json.dumps(raw).encode('utf-8'))
    count += 1
  writer.close()
  return count
