"""Data sources: JSONL (.gz), JSON arrays, Parquet, ArrayRecord and TFDS, as random-access records.

Every source becomes a `grain.MapDataset` of `{'where': ..., 'raw': ...}` items, where `where`
names the file and line (or index) for error reports and `raw` is the undecoded bytes of a JSON
line or record (decoded and parsed later, by `parse`, so a line that is not UTF-8 or not JSON
is one bad record, skipped under `data.on_bad_record='skip'`) or an already-parsed value.
Local JSONL and Parquet files are indexed and read line by line (never held whole; a .gz is
decompressed and a Parquet file converted to JSONL once, into the cache); a file that breaks
(a truncated .gz, a JSON array cut short) ends with one `Broken` item, a bad record like any
other, after the records before the break.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import io
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


@dataclasses.dataclass(frozen=True)
class Broken:
  """Where a file stops being readable (a truncated .gz, a JSON array cut short): the item
  after its last good record, a bad record like any other (`parse` raises BadRecord), so
  `data.on_bad_record=skip` keeps the records before it and `error` names the place."""

  reason: str
  detail: str


def parse(raw: Any) -> Any:
  """A source item's `raw` as a JSON value: bytes are decoded as UTF-8 and text parsed as JSON.

  Raises:
    BadRecord: 'bad_utf8', 'bad_json', or a `Broken` item's reason ('truncated'), with what is
      wrong (the caller adds file and line).
  """
  if isinstance(raw, Broken):
    raise BadRecord(raw.reason, raw.detail)
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


def _local(path: str) -> bool:
  return '://' not in path


def _read_bytes(path: str) -> bytes:
  """The file's bytes (a whole .gz is decompressed by `_gunzipped` instead)."""
  _exists(path)
  return epath.Path(path).read_bytes()


_CHUNK = 8 << 20  # bytes read at a time while indexing or decompressing
_WHITESPACE = np.array([9, 10, 13, 32], np.uint8)


def _line_index(f: Any, start_line: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(offset, length, line number) of every line with a non-blank byte, read from the binary
  file `f` in chunks: the file is never held whole."""
  offsets, lengths, numbers = [], [], []
  base, line, carry = 0, start_line, b''
  while True:
    chunk = f.read(_CHUNK)
    buf = carry + chunk
    if not buf:
      break
    arr = np.frombuffer(buf, np.uint8)
    ends = np.flatnonzero(arr == 10)
    if not chunk:  # the last line has no newline
      ends = np.append(ends, len(arr))
    starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
    solid = np.concatenate([[0], np.cumsum(~np.isin(arr, _WHITESPACE), dtype=np.int32)])
    keep = solid[ends] - solid[starts] > 0
    offsets.append(base + starts[keep])
    lengths.append((ends - starts)[keep])
    numbers.append(line + np.flatnonzero(keep))
    line += len(ends)
    done = ends[-1] + 1 if len(ends) else 0
    base, carry = base + done, buf[done:]
    if not chunk:
      break
  cat = lambda parts, dtype: np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)  # noqa: E731
  return cat(offsets, np.int64), cat(lengths, np.int64), cat(numbers, np.int64)


@functools.lru_cache(maxsize=8)
def _file_index(path: str, size: int, mtime_ns: int) -> tuple[np.ndarray, ...]:
  """`_line_index` of a local file, once per process and file version (preflight, the filters
  and the pipeline open the same sources)."""
  del size, mtime_ns  # part of the cache key only
  with open(path, 'rb') as f:
    return _line_index(f)


def _cache_dir() -> str:
  return os.environ.get('FTJAX_CACHE_DIR') or os.path.join(
      os.path.expanduser('~'), '.cache', 'ftjax')


def _gunzipped(path: str) -> tuple[str, Broken | None, int]:
  """A .jsonl.gz decompressed once, in chunks, into the cache (keyed by path, size and mtime):
  (the plain file, where the stream broke or None, the line after the last complete one)."""
  out = _cached(path, 'gunzip')
  broken_file = out + '.broken.json'
  if os.path.exists(out):
    if not os.path.exists(broken_file):
      return out, None, 0
    with open(broken_file) as f:
      saved = json.load(f)
    return out, Broken(saved['reason'], saved['detail']), saved['line']
  os.makedirs(os.path.dirname(out), exist_ok=True)
  tmp = f'{out}.{os.getpid()}.tmp'
  broken, lines, written, pending = None, 1, 0, b''
  # zlib rather than gzip.open: it hands over everything before a break, where gzip's read()
  # raises and drops the whole chunk.
  inflate, problem = zlib.decompressobj(16 + zlib.MAX_WBITS), None
  with open(path, 'rb') as src, open(tmp, 'wb') as dst:
    for compressed in iter(lambda: src.read(_CHUNK), b''):
      try:
        text = inflate.decompress(compressed)
        while inflate.eof and inflate.unused_data:  # a multi-member file: the next member
          rest, inflate = inflate.unused_data, zlib.decompressobj(16 + zlib.MAX_WBITS)
          text += inflate.decompress(rest)
      except zlib.error as e:
        problem = f'zlib.error: {e}'
        break
      pending += text
      cut = pending.rfind(b'\n') + 1
      dst.write(pending[:cut])
      lines += pending[:cut].count(b'\n')
      written += cut
      pending = pending[cut:]
    if problem is None and not inflate.eof:
      problem = 'the compressed stream ends before its end-of-stream marker'
    if problem is None:
      dst.write(pending)  # the last line, without its newline
    elif not written and not pending:  # nothing readable at all
      os.remove(tmp)
      raise DataError(f'{path}: truncated or corrupt gzip file ({problem})')
    else:
      broken = Broken('truncated', f'truncated gzip stream: it breaks after {written} bytes of '
                      f'text ({problem}); the lines before it are read')
  if broken is not None:  # the cut-off line is the broken record
    with open(broken_file, 'w') as f:
      json.dump({**dataclasses.asdict(broken), 'line': lines}, f)
  os.replace(tmp, out)
  return out, broken, lines


def _cached(path: str, kind: str) -> str:
  """Where the cache keeps a converted copy of a local file (keyed by path, size and mtime)."""
  st = os.stat(path)
  key = hashlib.sha256(f'{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}'.encode())
  return os.path.join(_cache_dir(), kind, key.hexdigest()[:24] + '.jsonl')


def _json_default(value: Any) -> Any:
  """Parquet values JSON has no type for: bytes as UTF-8 text, dates and decimals as text."""
  if isinstance(value, bytes):
    try:
      return value.decode('utf-8')
    except UnicodeDecodeError:
      pass
  return str(value)


def _parquet_lines(path: str) -> str:
  """A Parquet file converted once, one record batch at a time, into a JSONL file in the cache
  (row i on line i + 1), so it is indexed and read line by line like any JSONL: random access
  without decoding a whole row group per record, and never the whole table in memory."""
  out = _cached(path, 'parquet')
  if os.path.exists(out):
    return out
  import pyarrow.parquet as pq

  os.makedirs(os.path.dirname(out), exist_ok=True)
  tmp = f'{out}.{os.getpid()}.tmp'
  try:
    table = pq.ParquetFile(path)
  except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for a file it cannot read
    raise DataError(f'{path}: not a readable Parquet file ({type(e).__name__}: {e})') from None
  with open(tmp, 'w', encoding='utf-8') as dst:
    for batch in table.iter_batches(batch_size=4096):
      dst.write(''.join(json.dumps(row, ensure_ascii=False, default=_json_default) + '\n'
                        for row in batch.to_pylist()))
  os.replace(tmp, out)
  return out


class _Lines(grain.sources.RandomAccessDataSource):
  """The non-blank lines of a JSONL file, each with its line number. A local file is indexed
  (offset and length of every line) in one chunked pass and read line by line, so it is never
  held in memory; a .gz is first decompressed once into the cache; a remote one (gs://) is read
  whole. Lines stay bytes until parsed, so one line that is not UTF-8 is one bad record.
  `rows=True` (a Parquet file's JSONL copy) names records `path[row]` rather than `path:line`."""

  def __init__(self, path: str, data: bytes | None = None, *, file: str | None = None,
               rows: bool = False):
    self._path, self._file, self._fd, self._broken, self._data = path, file, None, None, data
    self._broken_line, self._rows = 0, rows
    if file is None and data is None and _local(path):
      _exists(path)
      if path.endswith('.gz'):
        self._file, self._broken, self._broken_line = _gunzipped(path)
      else:
        self._file = path
    elif file is None and data is None:
      self._data = _read_bytes(path)
      if path.endswith('.gz'):
        try:
          self._data = gzip.decompress(self._data)
        except (EOFError, OSError, zlib.error) as e:
          raise DataError(f'{path}: truncated or corrupt gzip file ({type(e).__name__}: '
                          f'{e})') from None
    if self._file is not None:
      st = os.stat(self._file)
      self._offsets, self._lengths, self._numbers = _file_index(self._file, st.st_size,
                                                                st.st_mtime_ns)
    else:
      self._offsets, self._lengths, self._numbers = _line_index(io.BytesIO(self._data))

  def __len__(self) -> int:
    return len(self._offsets) + (self._broken is not None)

  def __getstate__(self) -> dict[str, Any]:
    return {**self.__dict__, '_fd': None}  # each process opens its own

  def __getitem__(self, index: int) -> dict[str, Any]:
    if index == len(self._offsets) and self._broken is not None:
      return {'where': f'{self._path}:{self._broken_line}', 'raw': self._broken}
    offset, length = int(self._offsets[index]), int(self._lengths[index])
    where = (f'{self._path}[{self._numbers[index] - 1}]' if self._rows
             else f'{self._path}:{self._numbers[index]}')
    if self._file is None:
      return {'where': where, 'raw': self._data[offset:offset + length]}
    if self._fd is None:
      self._fd = os.open(self._file, os.O_RDONLY)
    return {'where': where, 'raw': os.pread(self._fd, length, offset)}


class _Records(grain.sources.RandomAccessDataSource):
  """Already-parsed records (JSON array, remote Parquet) with their index, and where the file
  broke."""

  def __init__(self, path: str, records: list[Any], broken: tuple[int, Broken] | None = None):
    self._path, self._records, self._broken = path, records, broken

  def __len__(self) -> int:
    return len(self._records) + (self._broken is not None)

  def __getitem__(self, index: int) -> dict[str, Any]:
    if index == len(self._records):
      line, broken = self._broken
      return {'where': f'{self._path}:{line}', 'raw': broken}
    return {'where': f'{self._path}[{index}]', 'raw': self._records[index]}


def _json_array(text: str) -> tuple[list[Any], tuple[int, Broken] | None]:
  """The elements of a JSON array, one at a time: where it breaks (cut short, or an element that
  is not JSON) the elements before are kept and the break becomes a bad record."""
  decoder = json.JSONDecoder()
  records, at = [], text.index('[') + 1
  while True:
    at = _skip_space(text, at)
    if at < len(text) and text[at] == ']':
      return records, None
    try:
      value, at = decoder.raw_decode(text, at)
    except json.JSONDecodeError as e:
      cut_short = not text.rstrip().endswith(']')
      return records, (e.lineno, Broken('truncated' if cut_short else 'bad_json',
                                        f'the JSON array breaks here ({e.msg}); the '
                                        f'{len(records)} elements before it are read'))
    records.append(value)
    at = _skip_space(text, at)
    if at < len(text) and text[at] == ',':
      at += 1
    elif not (at < len(text) and text[at] == ']'):
      line = text.count('\n', 0, at) + 1
      return records, (line, Broken('truncated', 'the JSON array ends without its closing "]"; '
                                    f'the {len(records)} elements before it are read'))


def _skip_space(text: str, at: int) -> int:
  while at < len(text) and text[at] in ' \t\r\n':
    at += 1
  return at


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
    return _Records(path, *_json_array(text))
  if kind == 'parquet':
    _exists(path)
    if _local(path):
      return _Lines(path, file=_parquet_lines(path), rows=True)
    import pyarrow.parquet as pq

    with epath.Path(path).open('rb') as f:
      return _Records(path, pq.read_table(f).to_pylist())
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
