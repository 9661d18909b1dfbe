"""`data.dedup`, `data.drop_contradictions`, `data.decontaminate`: the pipeline reads exactly the
clean records, the same on every host, and resumes exactly."""

import json

import numpy as np
import pytest
from test_data import opts, texts_of

from conftest import write_jsonl
from ftjax import config as config_lib
from ftjax import data, tokenizer
from ftjax.data import filters

CLEAN = 51


def _words(rng, n):
  letters = np.array(list('abcdefghijklmnopqrstuvwxyz'))
  return ' '.join(''.join(rng.choice(letters, rng.integers(3, 8))) for _ in range(n))


def _record(rng, prompt=None):
  return {'prompt': prompt or _words(rng, 12) + '? ', 'completion': _words(rng, 18)}


def _near(text, rng):
  chars = list(text)
  for i in rng.choice(np.flatnonzero(np.array(chars) != ' '), 2, replace=False):
    chars[i] = 'z' if chars[i] != 'z' else 'y'
  return ''.join(chars)


@pytest.fixture
def planted(tmp_path):
  """(train path, eval path, the texts the filters must keep): 51 clean records, 5 exact and 4
  near duplicates, 3 prompts answered twice differently, 3 held-out records copied in."""
  rng = np.random.default_rng(0)
  clean = [_record(rng) for _ in range(CLEAN)]
  held = [_record(rng) for _ in range(10)]
  train = list(clean)
  train += [{'prompt': r['prompt'].upper(), 'completion': '  ' + r['completion']}
            for r in clean[:5]]
  train += [{'prompt': _near(r['prompt'], rng), 'completion': r['completion']}
            for r in clean[10:14]]
  train += [_record(rng, r['prompt']) for r in clean[20:23]]
  train += held[:3]
  keep = [r for i, r in enumerate(clean) if not 20 <= i < 23]
  folder = tmp_path / 'planted'
  folder.mkdir()
  return (write_jsonl(folder / 'train.jsonl', train), write_jsonl(folder / 'eval.jsonl', held),
          sorted(r['prompt'] + r['completion'] for r in keep))


def _options(eval_path, **kw):
  return opts(seq_len=256, dedup='near', drop_contradictions=True, decontaminate=(eval_path,),
              **kw)


def test_the_pipeline_reads_exactly_the_clean_records(planted):
  train, held, want = planted
  kept = filters.keep([data.Source(train)], _options(held))
  assert kept.dropped == {'duplicate': 5, 'near_duplicate': 4, 'contradiction': 6,
                          'contaminated': 3}
  docs = data.documents([data.Source(train)], _options(held), seed=3)
  byte = tokenizer.byte_level()
  epoch = [byte.decode(docs[i]['tokens'].tolist()) for i in range(len(want))]
  assert sorted(epoch) == want
  exact_only = filters.keep([data.Source(train)], opts(seq_len=256, dedup='exact'))
  assert exact_only.dropped == {'duplicate': 5} and len(exact_only.indices[0]) == 66 - 5
  assert filters.keep([data.Source(train)], opts(seq_len=256)) is None


def test_two_hosts_see_disjoint_records_whose_union_is_the_filtered_set(planted):
  train, held, want = planted
  seen = []
  for host in range(2):
    it = data.train_batches([data.Source(train)], _options(held), global_batch=4, seed=0,
                            pack=False, shard=(host, 2))
    seen.append([t for _ in range(len(want) // 4) for t in texts_of(next(it))])
    assert it.filtered == {'duplicate': 5, 'near_duplicate': 4, 'contradiction': 6,
                           'contaminated': 3}
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == want


def test_filtered_batches_resume_exactly(planted):
  train, held, _ = planted

  def make():
    return data.train_batches([data.Source(train)], _options(held), global_batch=4, seed=5,
                              shard=(0, 1))

  uninterrupted = make()
  want = [next(uninterrupted) for _ in range(10)]
  first = make()
  for _ in range(4):
    next(first)
  resumed = make()
  resumed.set_state(json.loads(json.dumps(first.get_state())))
  for expected in want[4:]:
    got = next(resumed)
    for key in data.FIELDS:
      np.testing.assert_array_equal(got[key], expected[key])


def test_a_run_counts_the_filtered_records(planted, small_config, tmp_path):
  from ftjax import train

  path, held, _ = planted
  c = small_config
  c.data.update(path=path, eval_path='', dedup='exact', seq_len=256)
  bad = c.copy_and_resolve_references()
  bad.data.decontaminate = True
  with pytest.raises(config_lib.ConfigError, match='data.decontaminate=True needs held-out'):
    config_lib.resolve(bad)
  c.train.update(steps=2, log_every=2)
  summary = train.run(c, str(tmp_path / 'run'))
  assert summary['filtered_records'] == {'duplicate': 5}
  metrics = (tmp_path / 'run' / 'metrics.jsonl').read_text()
  rows = [json.loads(line) for line in metrics.splitlines()]
  assert [r['filtered_records'] for r in rows if 'loss' in r] == [5]
