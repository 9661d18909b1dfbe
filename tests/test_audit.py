"""`ftjax data audit` on data with planted faults: it finds exactly what was planted, and
nothing on the clean control set."""

import json
import os

import numpy as np
from helpers import run_ftjax, write_jsonl

from conftest import REPO
from ftjax.data import audit, dedup

K_EXACT, M_NEAR, C_CONTRA, E_LEAKED = 7, 5, 4, 3


def _words(rng, n):
  """n random made-up words (so distinct records share no 13-gram and no shingles by chance)."""
  letters = np.array(list('abcdefghijklmnopqrstuvwxyz'))
  return ' '.join(''.join(rng.choice(letters, rng.integers(3, 9))) for _ in range(n))


def _chat(rng, prompt=None, answer=None):
  return {'messages': [{'role': 'user', 'content': prompt or _words(rng, 20)},
                       {'role': 'assistant', 'content': answer or _words(rng, 25)}]}


def _change_chars(text, rng, n=2):
  chars = list(text)
  for i in rng.choice(np.flatnonzero(np.array(chars) != ' '), n, replace=False):
    chars[i] = 'Z' if chars[i] != 'Z' else 'Y'
  return ''.join(chars)


def _dataset(root, *, faults: bool):
  """Train and eval JSONL files: 200 clean chat records (+ 20 held out), and with `faults` the
  planted ones appended. Returns (train path, eval path)."""
  rng = np.random.default_rng(0)
  clean = [_chat(rng) for _ in range(200)]
  held_out = [_chat(rng) for _ in range(20)]
  lines = [json.dumps(r).encode() for r in clean]
  if faults:
    for r in clean[:K_EXACT]:  # the same text up to case and spacing
      m = r['messages']
      lines.append(json.dumps({'messages': [
          {'role': 'user', 'content': '  ' + m[0]['content'].upper().replace(' ', '   ')},
          m[1]]}).encode())
    for r in clean[10:10 + M_NEAR]:
      m = r['messages']
      lines.append(json.dumps(_chat(rng, _change_chars(m[0]['content'], rng),
                                    m[1]['content'])).encode())
    for r in clean[20:20 + C_CONTRA]:  # the same question, another answer
      lines.append(json.dumps(_chat(rng, r['messages'][0]['content'])).encode())
    lines += [json.dumps(r).encode() for r in held_out[:E_LEAKED]]
    lines += [b'{"messages": [{"role": "user", "content": "cut off', b'not json at all',
              b'{"text": "caf\xe9 latin-1"}']
    odd = [[('user', 'q'), ('assistant', 'a'), ('critic', 'c')],  # unknown_role
           [('assistant', 'hello'), ('user', 'q'), ('assistant', 'a')],  # starts_with_assistant
           [('user', 'q1'), ('user', 'q2'), ('assistant', 'a')],  # same_role_twice
           [('user', 'q'), ('assistant', '   ')],  # empty_answer
           [('user', 'q'), ('system', 's'), ('assistant', 'a')]]  # system_not_first
    for turns in odd:
      lines.append(json.dumps({'messages': [
          {'role': role, 'content': f'{text} {_words(rng, 6)}' if text.strip() else text}
          for role, text in turns]}).encode())
  train = root / 'train.jsonl'
  train.write_bytes(b'\n'.join(lines) + b'\n')
  return str(train), write_jsonl(root / 'eval.jsonl', held_out)


def _report(tmp_path, faults):
  from configs import base
  from ftjax import config as config_lib

  train, held = _dataset(tmp_path, faults=faults)
  c = base.get_config()
  c.data.update(path=train, eval_path=held, seq_len=256, on_bad_record='skip')
  r = config_lib.resolve(c)
  return audit.audit(list(r.data.sources), r.data.options, held_out=[held], pack=True, batch=8)


def test_the_audit_finds_exactly_the_planted_faults(tmp_path):
  r = _report(tmp_path, faults=True)
  assert r['bad_records']['by_reason'] == {'bad_json': 2, 'bad_utf8': 1}
  assert r['bad_records']['count'] == 3
  latin1_line = 200 + K_EXACT + M_NEAR + C_CONTRA + E_LEAKED + 3
  assert any(e['where'].endswith(f'train.jsonl:{latin1_line}') and e['reason'] == 'bad_utf8'
             for e in r['bad_records']['examples'])
  assert {k: v['count'] for k, v in r['structure'].items()} == {
      'unknown_role': 1, 'starts_with_assistant': 1, 'same_role_twice': 1, 'empty_answer': 1,
      'system_not_first': 1}
  assert r['duplicates']['count'] == K_EXACT
  assert r['duplicates']['examples'][0]['duplicate_of'].endswith('train.jsonl:1')
  assert r['near_duplicates']['count'] == M_NEAR
  assert r['near_duplicates']['examples'][0]['near_duplicate_of'].endswith('train.jsonl:11')
  assert r['contradictions']['count'] == C_CONTRA and r['contradictions']['records'] == 2 * C_CONTRA
  assert r['contamination']['count'] == E_LEAKED and r['contamination']['held_out'] == 20
  assert r['records']['total'] == 200 + K_EXACT + M_NEAR + C_CONTRA + E_LEAKED + 3 + 5
  assert r['records']['by_format'] == {'chat': r['records']['usable']}
  assert r['tokens']['over_seq_len'] > 0  # 20 + 25 words rendered: longer than 257 bytes


def test_the_audit_finds_nothing_on_clean_data(tmp_path):
  r = _report(tmp_path, faults=False)
  assert r['bad_records']['count'] == 0 and r['structure'] == {}
  for key in ('duplicates', 'near_duplicates', 'contradictions', 'contamination'):
    assert r[key]['count'] == 0, (key, r[key])
  assert r['records'] == {'total': 200, 'usable': 200, 'by_format': {'chat': 200}}
  assert 0 < r['tokens']['loss_token_share'] < 1 and 0 < r['tokens']['packing_efficiency'] <= 1


def test_near_duplicate_signatures_are_deterministic_and_graded():
  rng = np.random.default_rng(1)
  text = _words(rng, 60)
  a, b = dedup.signature(text), dedup.signature(text)
  assert (a == b).all() and a.dtype == np.uint32 and len(a) == dedup.NUM_PERM
  assert dedup.similarity(a, dedup.signature(_change_chars(text, rng))) >= dedup.THRESHOLD
  assert dedup.similarity(a, dedup.signature(_words(rng, 50))) < 0.2
  assert dedup.normalize('  Ünïcode\tTEXT  ') == dedup.normalize('ünïcode text')


def test_audit_command_writes_the_report_and_strict_gates(tmp_path):
  train, held = _dataset(tmp_path, faults=True)
  out = tmp_path / 'audit'
  args = ['data', 'audit', '--config', f'{REPO}/configs/base.py', f'--config.data.path={train}',
          f'--config.data.eval_path={held}', '--config.data.on_bad_record=skip',
          '--config.data.seq_len=256', f'--out={out}']
  done = run_ftjax(*args)
  assert done.returncode == 0, done.stderr[-2000:]
  report = json.loads((out / 'report.json').read_text())
  assert {'records', 'bad_records', 'duplicates', 'near_duplicates', 'contradictions',
          'contamination', 'tokens', 'sources'} <= set(report)
  assert report['duplicates']['count'] == K_EXACT
  for name in ('report.md', 'lengths.png', 'turns.png', 'sources.png'):
    assert os.path.getsize(out / name) > 0, name
  assert (out / 'lengths.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert 'exact duplicates' in (out / 'report.md').read_text()
  strict = run_ftjax(*args, '--strict')
  assert strict.returncode == 1
  assert 'audit.max_duplicate_share=0.05' not in strict.stdout  # 7/224 is under 5%
  assert 'threshold exceeded: audit.max_contamination=0.0: 0.1500' in strict.stdout
  relaxed = run_ftjax(*args, '--strict', '--config.audit.max_contamination=0.2',
                      '--config.audit.max_bad_record_share=0.5',
                      '--config.audit.max_truncated_share=1.0',
                      '--config.audit.max_contradiction_share=0.5')
  assert relaxed.returncode == 0, relaxed.stdout


def test_audit_of_one_source_file(tmp_path):
  train, _ = _dataset(tmp_path, faults=False)
  done = run_ftjax('data', 'audit', f'--source={train}', f'--out={tmp_path / "a"}')
  assert done.returncode == 0, done.stderr[-2000:]
  report = json.loads((tmp_path / 'a' / 'report.json').read_text())
  assert report['records']['total'] == 200 and report['contamination']['held_out'] == 0
