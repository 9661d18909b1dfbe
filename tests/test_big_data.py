"""A JSONL larger than 1 GB trains and audits with resident memory well under its size: lines
are indexed (offset, length) and read one by one, never held whole. Measured (2 cores): a
1.05 GiB file (215k records) audits at 593 MiB peak RSS, against 253 MiB on 100 records (what
the audit keeps per record: about 1.7 KB); training on it peaks at 778 MiB, against 754 MiB for
the same run on 100 records (the index adds about 24 bytes per line)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import cli_env, ftjax_command

from conftest import REPO


def _peak_rss_of(args, tmp_path, name):
  """Runs `ftjax ARGS` in a fresh child process and returns its peak resident set, in bytes
  (ru_maxrss of the children, read in a grandchild so earlier children do not count)."""
  script = ('import resource, subprocess, sys, json; '
            'p = subprocess.run(json.loads(sys.argv[1]), capture_output=True, text=True); '
            'print(json.dumps([p.returncode, p.stdout[-3000:], p.stderr[-3000:], '
            'resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss]))')
  # Without the session's compilation cache: a run that loads its executable from the cache
  # peaks lower than one that compiles, which would make the two runs below incomparable.
  env = {k: v for k, v in cli_env(1, None).items() if not k.startswith('JAX_COMPILATION_CACHE')}
  done = subprocess.run([sys.executable, '-c', script, json.dumps(ftjax_command(*args))],
                        capture_output=True, text=True, env=env, cwd=REPO, timeout=1800)
  code, out, err, kib = json.loads(done.stdout.strip().splitlines()[-1])
  assert code == 0, f'{name}: {err}'
  (tmp_path / f'{name}.log').write_text(out + err)
  return kib * 1024, out


@pytest.mark.slow
def test_a_1gb_jsonl_trains_and_audits_in_bounded_memory(tmp_path):
  rng = np.random.default_rng(0)
  words = np.array([''.join(rng.choice(list('abcdefghijklmnopqrstuvwxyz'), rng.integers(2, 9)))
                    for _ in range(20_000)])
  path = tmp_path / 'big.jsonl'
  with open(path, 'w') as f:
    while f.tell() < 1.05 * 2**30:
      f.write(''.join(json.dumps({'text': ' '.join(rng.choice(words, 700))}) + '\n'
                      for _ in range(1000)))
  size = os.path.getsize(path)
  assert size > 2**30
  def audit(data_path, name):
    return _peak_rss_of(['data', 'audit', '--config', f'{REPO}/configs/base.py',
                         f'--source={data_path}', f'--out={tmp_path / name}',
                         '--config.data.seq_len=128'], tmp_path, name)[0]

  audit_rss = audit(path, 'audit')
  report = json.loads((tmp_path / 'audit' / 'report.json').read_text())
  assert report['records']['total'] > 200_000 and report['duplicates']['count'] == 0
  def train(data_path, name):
    return _peak_rss_of(
        ['train', '--config', f'{REPO}/configs/base.py', f'--workdir={tmp_path / name}',
         f'--config.data.path={data_path}', '--config.data.seq_len=128',
         '--config.data.global_batch=4', '--config.model.preset=tiny', '--config.train.steps=3',
         '--config.train.log_every=1', '--config.train.progress=False',
         '--config.eval.every_steps=0', '--config.ckpt.every_steps=0'], tmp_path, name)

  small = tmp_path / 'small.jsonl'
  with open(path) as f:
    small.write_text(''.join(next(f) for _ in range(100)))
  audit_baseline_rss = audit(small, 'audit_baseline')
  baseline_rss, _ = train(small, 'baseline')  # jax, XLA and the model, with 100 records
  train_rss, out = train(path, 'run')
  assert 'done: 3 steps' in out
  print(f'file {size / 2**30:.2f} GiB; peak RSS audit {audit_rss / 2**20:.0f} MiB (on 100 '
        f'records: {audit_baseline_rss / 2**20:.0f}), train {train_rss / 2**20:.0f} MiB (on 100 '
        f'records: {baseline_rss / 2**20:.0f})')
  # What the audit keeps per record (its file:line, a 64-bin MinHash signature, lengths, exact
  # and prompt hashes) grows with the record count, not with the text: measured about 1.7 KB per
  # record here, against 5 KB of text per record.
  records = report['records']['total']
  per_record = (audit_rss - audit_baseline_rss) / records
  print(f'audit: {per_record:.0f} bytes per record more than on 100 records; '
        f'{size / records:.0f} bytes of text per record')
  assert per_record < 3 * 2**10, (audit_rss, audit_baseline_rss, records)
  assert train_rss - baseline_rss < 0.2 * size, (train_rss, baseline_rss, size)
