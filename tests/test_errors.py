"""Every user error of `ftjax train` is one line, `ftjax: error: ...`, naming what is wrong; exit 2.

Each case runs the real command in a subprocess: the exit code and stderr are the process's.
"""

import gzip
import os

import pytest
from helpers import run_ftjax, train_command

from conftest import REPO, write_jsonl

SMALL = ['--config.model.num_layers=1', '--config.model.embed_dim=16', '--config.model.mlp_dim=32',
         '--config.model.num_heads=2', '--config.model.num_kv_heads=1',
         '--config.model.head_dim=8', '--config.train.steps=2', '--config.train.log_every=1',
         '--config.data.global_batch=8', '--config.eval.every_steps=0']


def train(workdir, *flags, config=f'{REPO}/configs/demo.py'):
  return run_ftjax(*train_command(workdir, *SMALL, *flags, config=config), timeout=600)


def one_line_error(result, *fragments):
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  errors = [line for line in lines if line.startswith('ftjax: error: ')]
  assert result.returncode == 2, result.stderr[-3000:]
  assert len(errors) == 1 and 'Traceback' not in result.stderr, result.stderr[-3000:]
  for fragment in fragments:
    assert fragment in errors[0], errors[0]
  return errors[0]


@pytest.mark.slow
def test_config_file_errors(tmp_path):
  bad = tmp_path / 'bad.py'
  bad.write_text('def get_config(:\n  pass\n')
  one_line_error(run_ftjax('train', '--config', str(bad), '--workdir', str(tmp_path / 'w')),
                 f'{bad}:1: ', 'syntax error in the config file')
  one_line_error(run_ftjax('train', '--config', str(tmp_path / 'nope.py'), '--workdir', 'w'),
                 "nope.py': file not found")
  broken = tmp_path / 'broken.py'
  broken.write_text('def get_config():\n  return undefined_name\n')
  one_line_error(run_ftjax('train', '--config', str(broken), '--workdir', str(tmp_path / 'w')),
                 'failed to load', 'NameError')
  assert not os.path.exists(tmp_path / 'w')


@pytest.mark.slow
def test_values_and_data_errors(tmp_path):
  one_line_error(train(tmp_path / 'w', '--config.optim.lr=-0.1'), 'optim.lr=-0.1 must be >= 0')
  one_line_error(train(tmp_path / 'w', '--config.data.tokenizer=/no/such/tokenizer'),
                 '/no/such/tokenizer')
  gz = tmp_path / 'cut.jsonl.gz'
  payload = gzip.compress(b''.join(b'{"text": "record %d"}\n' % i for i in range(200)))
  gz.write_bytes(payload[:len(payload) // 2])
  one_line_error(train(tmp_path / 'w', f'--config.data.path={gz}'),
                 str(gz), 'truncated gzip stream')
  latin = tmp_path / 'latin1.jsonl'
  latin.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
  one_line_error(train(tmp_path / 'w', f'--config.data.path={latin}'),
                 f'{latin}:2: not valid UTF-8', 'data.on_bad_record=skip')
  long = write_jsonl(tmp_path / 'long.jsonl', [{'prompt': 'x' * 200, 'completion': 'y'}] * 20)
  one_line_error(train(tmp_path / 'w', f'--config.data.path={long}', '--config.data.seq_len=32'),
                 'no_target', 'data.seq_len=32')
  assert not os.path.exists(tmp_path / 'w')


@pytest.mark.slow
def test_workdir_errors(tmp_path):
  a_file = tmp_path / 'file'
  a_file.write_text('not a directory')
  one_line_error(train(a_file), 'is a file, not a directory')
  if os.geteuid() == 0:  # root writes through permission bits; /sys refuses everyone
    read_only = '/sys/ftjax-test-run'
  else:
    os.makedirs(tmp_path / 'ro')
    os.chmod(tmp_path / 'ro', 0o500)
    read_only = str(tmp_path / 'ro' / 'run')
  one_line_error(train(read_only), 'cannot write in')
  assert train(tmp_path / 'run').returncode == 0
  config_json = (tmp_path / 'run' / 'config.json').read_text()
  one_line_error(train(tmp_path / 'run', '--config.ckpt.resume=never'),
                 'already holds checkpoints', '--config.ckpt.overwrite=True')
  assert (tmp_path / 'run' / 'config.json').read_text() == config_json
  (tmp_path / 'run' / 'config.json').write_text('{"model": ')
  one_line_error(run_ftjax('export', f'--workdir={tmp_path / "run"}', f'--out={tmp_path / "hf"}'),
                 'config.json: not a readable ftjax config.json')
  one_line_error(run_ftjax('generate', f'--workdir={tmp_path / "run"}', '--prompt=1+1='),
                 'config.json: not a readable ftjax config.json')
