"""The minimal JSONL data path: validation, masking, shifting, per-host batches."""

import json

import numpy as np
import pytest

from conftest import write_jsonl
from ftjax import data, tokenizer


def test_jsonl_errors_name_file_and_line(tmp_path):
  path = tmp_path / 'x.jsonl'
  path.write_text('{"text": "ok"}\nnot json\n')
  with pytest.raises(data.DataError, match=rf'{path}:2: not valid JSON'):
    data.read_jsonl(str(path))
  path.write_text('{"text": 3}\n')
  with pytest.raises(data.DataError, match=rf"{path}:1: field 'text' must be a string"):
    data.read_jsonl(str(path))


def test_prompt_tokens_are_masked_and_rows_shifted(tmp_path):
  tok = tokenizer.byte_level()
  row = data.EncodeRow(tok, 10, 'completion').map({'prompt': '1+2=', 'completion': '3'})
  ids = [tok.bos_id] + tok.encode('1+2=3') + [tok.eos_id]
  np_equal = lambda a, b: list(a) == list(b)
  assert np_equal(row['tokens'][:6], ids[:-1]) and np_equal(row['targets'][:6], ids[1:])
  # Only the completion ('3') and EOS are predicted.
  assert np_equal(row['loss_mask'], [0, 0, 0, 0, 1, 1, 0, 0, 0, 0])
  assert np_equal(row['segment_ids'], [1] * 6 + [0] * 4)
  everything = data.EncodeRow(tok, 10, 'all').map({'prompt': '1+2=', 'completion': '3'})
  assert np_equal(everything['loss_mask'], [1] * 6 + [0] * 4)


def test_byte_tokenizer_round_trips_any_text():
  tok = tokenizer.byte_level()
  text = 'Grüße, 世界! 12+30=42'
  assert tok.decode(tok.encode(text)) == text
  assert tok.vocab_size == 259 and max(tok.encode(text)) < 259


def test_train_batches_shuffle_deterministically_and_resume(tmp_path):
  path = write_jsonl(tmp_path / 't.jsonl', [{'text': f'record {i}'} for i in range(20)])
  make = lambda: data.train_batches(path, tokenizer.byte_level(), seq_len=12, global_batch=4,
                                    seed=3, train_on='all')
  first = [next(it)['tokens'] for it in [make()] for _ in range(8)]
  again = make()
  for want in first[:3]:
    np.testing.assert_array_equal(next(again)['tokens'], want)
  resumed = make()
  resumed.set_state(again.get_state())
  for want in first[3:]:
    np.testing.assert_array_equal(next(resumed)['tokens'], want)
  # One epoch (5 batches of 4) covers every record once; the next epoch is reshuffled.
  epoch = lambda batches: sorted(bytes(r).hex() for b in batches for r in b)
  assert len(set(epoch(first[:5]))) == 20
  assert not all(np.array_equal(a, b) for a, b in zip(first[:3], first[5:8], strict=True))


def test_eval_batches_cover_every_example_once(tmp_path):
  path = write_jsonl(tmp_path / 'e.jsonl', [{'prompt': f'{i}=', 'completion': str(i)}
                                            for i in range(11)])
  batches = data.eval_batches(path, tokenizer.byte_level(), seq_len=8, global_batch=4,
                              train_on='completion', max_examples=-1)
  assert len(batches) == 3
  real_rows = sum(int((b['loss_mask'].sum(axis=1) > 0).sum()) for b in batches)
  assert real_rows == 11


def test_chat_template_renders_sandboxed(tmp_path):
  import jinja2
  from test_pretrained_run import add_bpe_tokenizer

  add_bpe_tokenizer(str(tmp_path), ['hello world, how are you?'] * 20)
  config = json.loads((tmp_path / 'tokenizer_config.json').read_text())
  config['chat_template'] = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>"
                             "{{ m['content'] }}{{ eos_token }}{% endfor %}"
                             "{% if add_generation_prompt %}<|assistant|>{% endif %}")
  (tmp_path / 'tokenizer_config.json').write_text(json.dumps(config))
  tok = tokenizer.load(str(tmp_path))
  messages = [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'hello'}]
  assert tok.apply_chat_template(messages) == '<s><|user|>hi</s><|assistant|>hello</s>'
  assert tok.apply_chat_template(messages[:1], add_generation_prompt=True).endswith(
      '<|assistant|>')
  hostile = dict(config, chat_template="{{ ''.__class__.__mro__[1].__subclasses__() }}")
  (tmp_path / 'tokenizer_config.json').write_text(json.dumps(hostile))
  with pytest.raises(jinja2.exceptions.SecurityError):
    tokenizer.load(str(tmp_path)).apply_chat_template(messages)
