"""The SFT data pipeline: sources, formats and loss masks, packing, host sharding, resume."""

import dataclasses
import gzip
import json
import re

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import write_jsonl
from ftjax import data, tokenizer
from ftjax.models import llama


def opts(tok='byte', seq_len=32, **kw):
  return data.Options(tokenizer=tok, seq_len=seq_len, **kw)


def texts_of(rows):
  """Decoded documents of padded/packed rows, one string per segment."""
  tok = tokenizer.byte_level()
  out = []
  for tokens, segments in zip(rows['tokens'], rows['segment_ids'], strict=True):
    for s in sorted(set(segments.tolist()) - {0}):
      out.append(tok.decode(tokens[segments == s].tolist()))
  return out


@pytest.fixture
def chat_tokenizer(tmp_path):
  from helpers import add_bpe_tokenizer

  folder = tmp_path / 'tok'
  add_bpe_tokenizer(str(folder), ['<|im_start|>user\nhow are you?<|im_end|>\n'] * 50)
  return str(folder)


def test_chat_loss_mask_is_exactly_the_assistant_turns(chat_tokenizer):
  messages = [{'role': 'system', 'content': 'be brief'}, {'role': 'user', 'content': 'hi there'},
              {'role': 'assistant', 'content': 'hello!'}, {'role': 'user', 'content': 'how?'},
              {'role': 'assistant', 'content': 'fine, thanks'}]
  encoder = data.Encoder(chat_tokenizer, chat_template='chatml')
  ids, weights = encoder.encode({'messages': messages})
  tok = tokenizer.load(chat_tokenizer)
  rendered = dataclasses.replace(tok, chat_template=data.TEMPLATES['chatml']).apply_chat_template(
      messages)
  # Independently of the encoder: in chatml, an assistant turn runs from after
  # '<|im_start|>assistant\n' through its '<|im_end|>\n'.
  spans = [m.span(1) for m in re.finditer(r'<\|im_start\|>assistant\n(.*?<\|im_end\|>\n)',
                                          rendered, re.S)]
  want_ids, offsets = tok.encode_with_offsets(rendered)
  assert ids == want_ids
  expected = [int(any(a <= s < b for a, b in spans)) for s, _ in offsets]
  assert weights == expected
  learned = ''.join(rendered[s:e] for (s, e), w in zip(offsets, weights, strict=True) if w)
  assert learned == 'hello!<|im_end|>\nfine, thanks<|im_end|>\n'
  # sharegpt is the same conversation under other keys.
  sharegpt = {'conversations': [{'from': {'user': 'human', 'assistant': 'gpt'}.get(
      m['role'], m['role']), 'value': m['content']} for m in messages]}
  assert encoder.encode(sharegpt) == (ids, weights)


def test_prompt_completion_and_alpaca_masks():
  tok = tokenizer.byte_level()
  ids, weights = data.Encoder('byte').encode({'prompt': '1+2=', 'completion': '3'})
  assert ids == [tok.bos_id] + tok.encode('1+2=3') + [tok.eos_id]
  assert weights == [0] * 5 + [1, 1]
  ids, weights = data.Encoder('byte', train_on='all').encode({'prompt': '1+2=', 'completion': '3'})
  assert weights == [1] * 7
  ids, weights = data.Encoder('byte').encode({'instruction': 'add', 'input': '1 2',
                                              'output': '3'})
  text = tok.decode(ids)
  assert '### Instruction:\nadd' in text and '### Input:\n1 2' in text
  assert tok.decode([i for i, w in zip(ids, weights, strict=True) if w]) == '3'


@pytest.mark.slow
def test_packed_rows_give_the_logits_of_each_document_alone(tmp_path):
  records = [{'text': 'x' * n + str(n)} for n in (3, 9, 5, 14, 2, 7, 11, 4)]
  path = write_jsonl(tmp_path / 'docs.jsonl', records)
  batch = next(data.train_batches([data.Source(path)], opts(seq_len=24), global_batch=2, seed=0,
                                  shard=(0, 1)))
  assert np.count_nonzero(batch['segment_ids']) > 24  # several documents per row
  model = llama.Llama(llama.PRESETS['tiny'], rngs=nnx.Rngs(0))
  logits = np.asarray(model(jnp.asarray(batch['tokens']), jnp.asarray(batch['positions']),
                            jnp.asarray(batch['segment_ids'])))
  checked = 0
  for r in range(2):
    for s in set(batch['segment_ids'][r].tolist()) - {0}:
      where = batch['segment_ids'][r] == s
      np.testing.assert_array_equal(batch['positions'][r][where], np.arange(where.sum()))
      alone = np.asarray(model(jnp.asarray(batch['tokens'][r][where][None])))[0]
      np.testing.assert_allclose(logits[r][where], alone, atol=1e-5, rtol=1e-5)
      # Targets stay inside their document: the last target is that document's EOS.
      assert batch['targets'][r][where][-1] == tokenizer.byte_level().eos_id
      checked += 1
  assert checked >= 3


def test_hosts_see_disjoint_shards_that_cover_the_dataset(tmp_path):
  records = [{'text': f'record {i}'} for i in range(24)]
  path = write_jsonl(tmp_path / 'r.jsonl', records)
  byte = tokenizer.byte_level()
  unpacked, packed = [], []
  for host in range(2):
    it = data.train_batches([data.Source(path)], opts(seq_len=12), global_batch=4, seed=0,
                            pack=False, shard=(host, 2))
    unpacked.append([t for _ in range(6) for t in texts_of(next(it))])  # one epoch: 6 steps
    # Packed, a host packs documents host, host+2, ... of the shared stream.
    docs = data.documents([data.Source(path)], opts(seq_len=12), seed=0)[host::2]
    packed.append([byte.decode(docs[i]['tokens'][1:].tolist()) for i in range(12)])
  for seen in (unpacked, packed):
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(r['text'] for r in records)


@pytest.mark.slow
def test_unpacked_global_batches_do_not_depend_on_the_process_count(tmp_path):
  path = write_jsonl(tmp_path / 'r.jsonl', [{'text': f'doc {i}'} for i in range(23)])
  make = lambda shard: data.train_batches([data.Source(path)], opts(), global_batch=4, seed=0,
                                          pack=False, shard=shard)
  one, two = make((0, 1)), [make((0, 2)), make((1, 2))]
  for _ in range(9):
    whole, halves = next(one), [next(h) for h in two]
    for key in data.FIELDS:
      np.testing.assert_array_equal(whole[key], np.concatenate([h[key] for h in halves]))
  # A position saved by either host means the same global batch in a 1-process run.
  assert two[0].get_state() == two[1].get_state() == one.get_state()


def test_resume_gives_the_batches_of_an_uninterrupted_run(tmp_path):
  a = write_jsonl(tmp_path / 'a.jsonl', [{'text': f'alpha {i} ' * (i % 4 + 1)} for i in range(30)])
  b = write_jsonl(tmp_path / 'b.jsonl', [{'prompt': f'{i}?', 'completion': f'{i}!'}
                                         for i in range(40)])
  sources = [data.Source(a, weight=2.0), data.Source(b)]

  def make():
    return data.train_batches(sources, opts(seq_len=40), global_batch=4, seed=5, shard=(0, 1))

  uninterrupted = make()
  want = [next(uninterrupted) for _ in range(12)]
  first = make()
  for _ in range(5):
    next(first)
  state = json.loads(json.dumps(first.get_state()))  # survives serialisation, as in a checkpoint
  resumed = make()
  resumed.set_state(state)
  for expected in want[5:]:
    got = next(resumed)
    for key in data.FIELDS:
      np.testing.assert_array_equal(got[key], expected[key])


def test_mixture_follows_the_weights(tmp_path):
  a = write_jsonl(tmp_path / 'a.jsonl', [{'text': 'a'}] * 10)
  b = write_jsonl(tmp_path / 'b.jsonl', [{'text': 'b'}] * 10)
  docs = data.documents([data.Source(a, weight=3.0), data.Source(b, weight=1.0)], opts(), seed=0)
  letters = [tokenizer.byte_level().decode(docs[i]['tokens'].tolist())[-1] for i in range(400)]
  assert letters.count('a') / len(letters) == pytest.approx(0.75, abs=0.02)


def _tfds_source(tmp_path, records):
  import tensorflow_datasets as tfds

  class TinyChat(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {'prompt': tfds.features.Text(), 'completion': tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples()}

    def _generate_examples(self):
      yield from enumerate(records)

  TinyChat(data_dir=str(tmp_path / 'tfds'), file_format='array_record').download_and_prepare()
  return 'tfds://tiny_chat/train', str(tmp_path / 'tfds')


def test_every_source_type_reads_the_same_records(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq

  records = [{'prompt': f'q{i}', 'completion': f'a{i}'} for i in range(9)]
  jsonl = write_jsonl(tmp_path / 'r.jsonl', records)
  (tmp_path / 'r.jsonl.gz').write_bytes(gzip.compress((tmp_path / 'r.jsonl').read_bytes()))
  (tmp_path / 'r.json').write_text(json.dumps(records))
  pq.write_table(pa.Table.from_pylist(records), tmp_path / 'r.parquet')
  assert data.prepare(jsonl, str(tmp_path / 'r.array_record')) == 9
  tfds_path, tfds_dir = _tfds_source(tmp_path, records)
  paths = [jsonl, str(tmp_path / 'r.jsonl.gz'), str(tmp_path / 'r.json'),
           str(tmp_path / 'r.parquet'), str(tmp_path / 'r.array_record'), tfds_path]
  assert [data.kind_of(p) for p in paths] == ['jsonl', 'jsonl', 'json', 'parquet',
                                               'array_record', 'tfds']
  for path in paths:
    rows = data.eval_batches([data.Source(path)], opts(tfds_data_dir=tfds_dir), global_batch=9,
                             shard=(0, 1))
    got = sorted(texts_of(rows[0]))
    assert got == sorted(f'q{i}a{i}' for i in range(9)), path


def test_bad_records_error_or_are_skipped_and_counted(tmp_path):
  path = tmp_path / 'bad.jsonl'
  path.write_text('{"text": "fine"}\nnot json\n{"prompt": "no completion"}\n'
                  '{"text": 7}\n{"text": "' + 'long ' * 20 + '"}\n')
  with pytest.raises(data.DataError, match=rf'{path}:2: not valid JSON'):
    data.eval_batches([data.Source(str(path))], opts(), global_batch=1, shard=(0, 1))
  skip = opts(seq_len=16, on_bad_record='skip', on_too_long='skip')
  it = data.train_batches([data.Source(str(path))], skip, global_batch=1, seed=0, pack=False,
                          shard=(0, 1))
  texts = [t for _ in range(10) for t in texts_of(next(it))]
  # Skipped records leave all-padding rows (no loss), so row positions never shift.
  assert texts and set(texts) == {'fine'}
  assert it.skipped.counts['bad_json'] >= 1 and it.skipped.counts['unknown_format'] >= 1
  assert it.skipped.counts['wrong_type'] >= 1 and it.skipped.counts['too_long'] >= 1
  with pytest.raises(data.DataError, match=rf'{path}:5: example has \d+ tokens, more than'):
    data.EncodeDoc(data.Encoder('byte'), 16, 'skip', 'error').map(
        {'where': f'{path}:5', 'raw': path.read_text().splitlines()[4]})


def test_truncation_keeps_the_loss_mask_aligned():
  doc = data.EncodeDoc(data.Encoder('byte'), 8).map(
      {'where': 'x', 'raw': {'prompt': 'abcd', 'completion': 'efghijkl'}})
  assert len(doc['tokens']) == 8
  tok = tokenizer.byte_level()
  assert tok.decode(doc['targets'][doc['loss_mask'] == 1].tolist()) == 'efgh'
