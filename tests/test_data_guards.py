"""Data that cannot train (bad bytes, no targets, nothing usable) fails early and clearly."""

import gzip
import json
import re
import threading

import numpy as np
import pytest

from conftest import write_jsonl
from ftjax import data, tokenizer


def opts(seq_len=16, **kw):
  return data.Options(tokenizer=tokenizer.BYTE, seq_len=seq_len, **kw)


def texts_of(rows):
  tok = tokenizer.byte_level()
  return [tok.decode(tokens[segments == s].tolist())
          for tokens, segments in zip(rows['tokens'], rows['segment_ids'], strict=True)
          for s in sorted(set(segments.tolist()) - {0})]


def raised_within(seconds, fn):
  """The exception `fn` raises, failing the test if it neither raises nor returns in time (an
  endless loop is left spinning in a daemon thread rather than hanging the suite)."""
  outcome = {}

  def target():
    try:
      fn()
    except Exception as e:  # the test inspects whichever exception it was
      outcome['error'] = e

  thread = threading.Thread(target=target, daemon=True)
  thread.start()
  thread.join(seconds)
  assert not thread.is_alive(), f'still running after {seconds}s: the pipeline loops forever'
  assert 'error' in outcome, 'expected an exception'
  return outcome['error']


def test_a_line_that_is_not_utf8_is_one_bad_record(tmp_path):
  path = tmp_path / 'bad.jsonl'
  path.write_bytes(b'{"text": "one"}\n{"text": "two"}\n{"text": "caf\xe9"}\n{"text": "four"}\n')
  with pytest.raises(data.DataError, match=rf'^{path}:3: not valid UTF-8 .*column 14.*'
                                           r'set data.on_bad_record=skip'):
    data.eval_batches([data.Source(str(path))], opts(), global_batch=1, shard=(0, 1))
  it = data.train_batches([data.Source(str(path))], opts(on_bad_record='skip'), global_batch=4,
                          seed=0, pack=False, shard=(0, 1))
  texts = [t for _ in range(3) for t in texts_of(next(it))]
  assert sorted(set(texts)) == ['four', 'one', 'two']
  # One per epoch of 4 rows, and more for the rows grain has read ahead.
  assert set(it.skipped.counts) == {'bad_utf8'} and it.skipped.counts['bad_utf8'] >= 3


def test_a_truncated_gzip_or_json_array_keeps_the_records_before_the_break(tmp_path, monkeypatch):
  """A .jsonl.gz cut short, or a JSON array cut short, is read up to the break: the break is one
  bad record naming file:line (an error under on_bad_record=error, skipped under skip); a file
  that is not gzip at all names the file."""
  monkeypatch.setenv('FTJAX_CACHE_DIR', str(tmp_path / 'cache'))
  lines = [b'{"text": "record %d"}\n' % i for i in range(2000)]
  whole = gzip.compress(b''.join(lines), compresslevel=1)
  cut, corrupt = tmp_path / 'cut.jsonl.gz', tmp_path / 'corrupt.jsonl.gz'
  cut.write_bytes(whole[: len(whole) // 2])
  corrupt.write_bytes(b'this is not gzip data')
  array = tmp_path / 'cut.json'
  array.write_text('[\n' + ',\n'.join(f'{{"text": "record {i}"}}' for i in range(50))[:-9])
  with pytest.raises(data.DataError, match=rf'^{corrupt}: truncated or corrupt gzip file \('):
    data.train_batches([data.Source(str(corrupt))], opts(), global_batch=2, seed=0, shard=(0, 1))
  for path, reason, detail in ((cut, 'truncated', 'truncated gzip stream'),
                               (array, 'truncated', 'the JSON array breaks here')):
    records = data.sources.open_records(str(path))
    kept = len(records) - 1
    assert 0 < kept < (2000 if path == cut else 50)
    assert [data.sources.parse(records[i]["raw"])['text'] for i in range(kept)] == [
        f'record {i}' for i in range(kept)]
    with pytest.raises(data.DataError, match=rf'^{path}:{kept + (1 if path == cut else 2)}: '
                                             rf'{detail}.*set data.on_bad_record=skip'):
      data.eval_batches([data.Source(str(path))], opts(), global_batch=1, shard=(0, 1))
    it = data.train_batches([data.Source(str(path))], opts(on_bad_record='skip'), global_batch=4,
                            seed=0, pack=False, shard=(0, 1))
    texts = {t for _ in range(kept // 4) for t in texts_of(next(it))}
    assert texts <= {f'record {i}' for i in range(kept)}
    assert set(it.skipped.counts) <= {reason}


def test_a_document_with_no_target_is_skipped(tmp_path):
  encode = data.EncodeDoc(data.Encoder(tokenizer.BYTE), 16)
  long_prompt = {'prompt': 'x' * 20, 'completion': 'y'}
  assert encode.map({'where': 'f:1', 'raw': long_prompt}) == {'skip': 'no_target', 'where': 'f:1'}
  chat = {'messages': [{'role': 'user', 'content': 'x' * 40},
                       {'role': 'assistant', 'content': 'ok'}]}
  assert encode.map({'where': 'f:2', 'raw': chat})['skip'] == 'no_target'
  assert encode.map({'where': 'f:3', 'raw': {'prompt': 'x', 'completion': 'y'}})['loss_mask'].any()

  records = [long_prompt if i % 3 == 0 else {'prompt': f'{i}=', 'completion': 'ok'}
             for i in range(90)]
  path = write_jsonl(tmp_path / 'r.jsonl', records)
  for pack in (False, True):
    it = data.train_batches([data.Source(path)], opts(), global_batch=4, seed=0, pack=pack,
                            shard=(0, 1))
    for _ in range(10):
      rows = next(it)
      for mask, segments in zip(rows['loss_mask'], rows['segment_ids'], strict=True):
        for s in set(segments.tolist()) - {0}:
          assert mask[segments == s].any()  # no document without a target reaches a row
    assert it.skipped.counts['no_target'] > 0 and set(it.skipped.counts) == {'no_target'}
  # Held-out rows drop them too: 60 of the 90 have a target.
  rows = data.eval_batches([data.Source(path)], opts(), global_batch=10, shard=(0, 1))
  assert sum(int(np.count_nonzero(b['segment_ids'].any(axis=1))) for b in rows) == 60


@pytest.mark.parametrize('pack', [True, False])
def test_a_pipeline_where_every_record_is_skipped_raises_instead_of_looping(tmp_path, pack):
  records = [{'prompt': 'x' * 40, 'completion': 'y'}] * 1200
  path = write_jsonl(tmp_path / 'all_skipped.jsonl', records)
  it = data.train_batches([data.Source(path)], opts(), global_batch=4, seed=0, pack=pack,
                          shard=(0, 1))

  def drain():
    for _ in range(1_000_000):  # unpacked, all-padding batches would come forever
      next(it)

  error = raised_within(120, drain)
  assert isinstance(error, data.DataError), repr(error)
  match = re.match(r'data: the last (\d+) records were all skipped \(no_target: (\d+)\); nothing '
                   r'to train on — check data.seq_len / data.train_on / the file \(last skipped: '
                   rf'{path}:\d+\)$', str(error))
  assert match, str(error)
  # The limit is the larger of 1000 and the record count, 1200 here. Unpacked, grain's read-ahead
  # threads (a prefetch buffer of 500 rows by default) may map more rows before the error
  # reaches the caller; on a loaded machine (pytest -n auto) they do.
  assert 1200 < int(match[1]) < 1800 and 1200 < int(match[2]) < 1800


def test_a_mixture_with_one_unusable_source_still_trains(tmp_path):
  bad = write_jsonl(tmp_path / 'bad.jsonl', [{'prompt': 'x' * 40, 'completion': 'y'}] * 500)
  good = write_jsonl(tmp_path / 'good.jsonl', [{'text': f'g{i}'} for i in range(500)])
  it = data.train_batches([data.Source(bad, weight=9.0), data.Source(good)], opts(),
                          global_batch=4, seed=0, shard=(0, 1))
  texts = [t for _ in range(12) for t in texts_of(next(it))]
  assert texts and all(t.startswith('g') for t in texts)
  # More skips in all than the limit (1000), but never that many in a row.
  assert it.skipped.counts['no_target'] > 1000


def test_preflight_counts_a_crafted_file(tmp_path):
  lines = ([json.dumps({'text': 'short'})] * 60 + [json.dumps({'text': 'z' * 30})] * 20
           + [json.dumps({'prompt': 'p' * 30, 'completion': 'c'})] * 12 + ['{"text": '] * 8)
  path = tmp_path / 'train.jsonl'
  path.write_text('\n'.join(lines[i] for i in np.random.default_rng(0).permutation(100)) + '\n')
  report = data.preflight([data.Source(str(path))], opts(on_bad_record='skip'))
  assert report.summary_line() == (f'data: {path}: 100 records (parsed all, 8 bad (bad_json 8)), '
                              '100 encoded: 20 truncated (20.0%), 20 skipped (no_target 12, '
                              'bad_json 8)')
  (source,) = report.sources
  assert (source.records, source.encoded, source.usable) == (100, 100, 80)
  # A sample encodes only that many records, but every record is still parsed.
  (source,) = data.preflight([data.Source(str(path))], opts(on_bad_record='skip'),
                             sample=10).sources
  assert (source.encoded, source.bad) == (10, {'bad_json': 8})
  with pytest.raises(data.DataError, match=rf'^{path}:\d+: not valid JSON .*on_bad_record=skip'):
    data.preflight([data.Source(str(path))], opts())


def test_preflight_finds_a_bad_line_deep_in_a_file_before_any_batch(tmp_path):
  lines = [json.dumps({'text': f'record {i}'}) for i in range(5000)]
  lines[2999] = '{"text": "unterminated'
  path = tmp_path / 'big.jsonl'
  path.write_text('\n'.join(lines) + '\n')
  # sample=1 encodes only the first record: only the full parse can see line 3000.
  with pytest.raises(data.DataError, match=rf'^{path}:3000: not valid JSON \(.*\) \(set '
                                           r'data.on_bad_record=skip to skip such records\)$'):
    data.preflight([data.Source(str(path))], opts(), sample=1)
  raw = [line.encode() for line in lines]
  raw[2999] = b'{"text": "caf\xe9"}'  # Latin-1, not UTF-8
  path.write_bytes(b'\n'.join(raw))
  with pytest.raises(data.DataError, match=rf'^{path}:3000: not valid UTF-8'):
    data.preflight([data.Source(str(path))], opts(), sample=1)


def test_preflight_raises_when_every_sampled_record_is_skipped(tmp_path):
  path = write_jsonl(tmp_path / 'long.jsonl', [{'prompt': 'x' * 40, 'completion': 'y'}] * 600)
  with pytest.raises(data.DataError, match=(
      rf'^data: all 512 sampled records of {path} were skipped \(no_target: 512\): a prompt '
      r'longer than data.seq_len=16 leaves no target')):
    data.preflight([data.Source(path)], opts())
  # Long enough for a target, it passes.
  assert data.preflight([data.Source(path)], opts(seq_len=64)).sources[0].usable == 512


def test_parquet_is_read_row_by_row_from_a_cached_jsonl_copy(tmp_path, monkeypatch):
  """A Parquet file with several row groups is converted once, batch by batch, into a JSONL copy
  in the cache and read through its line index: the same rows as pyarrow's whole-table read,
  named path[row], values JSON has no type for (bytes, dates) as text, and a second open reuses
  the copy; a file that is not Parquet names the file."""
  import datetime

  import pyarrow as pa
  import pyarrow.parquet as pq

  cache = tmp_path / 'cache'
  monkeypatch.setenv('FTJAX_CACHE_DIR', str(cache))
  rows = [{'prompt': f'q{i} ✓', 'completion': f'a{i}', 'blob': b'raw %d' % i,
           'day': datetime.date(2026, 1, 1 + i % 28)} for i in range(10_000)]
  path = tmp_path / 'r.parquet'
  pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=3000)
  assert pq.ParquetFile(path).num_row_groups == 4
  records = data.sources.open_records(str(path))
  assert len(records) == 10_000
  for i in (0, 2999, 3000, 9999, 4321):
    item = records[i]
    assert item['where'] == f'{path}[{i}]'
    assert data.sources.parse(item['raw']) == {
        'prompt': f'q{i} ✓', 'completion': f'a{i}', 'blob': f'raw {i}',
        'day': str(rows[i]['day'])}
  copies = list((cache / 'parquet').iterdir())
  assert len(copies) == 1
  stamp = copies[0].stat().st_mtime_ns
  assert len(data.sources.open_records(str(path))) == 10_000
  assert copies[0].stat().st_mtime_ns == stamp  # not converted again
  bad = tmp_path / 'bad.parquet'
  bad.write_text('{"prompt": "this is JSON, not Parquet"}\n')
  with pytest.raises(data.DataError, match=rf'^{bad}: not a readable Parquet file'):
    data.sources.open_records(str(bad))
