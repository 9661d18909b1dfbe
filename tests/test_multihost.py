"""Real multi-process runs on this machine: processes joined over 127.0.0.1 with CPU collectives."""

import json
import os
import sys

import pytest
from helpers import ftjax_command, run_command, run_ftjax, train_command

from conftest import REPO

RESTART = 75


def _train(workdir, *flags, processes=1, devices=8, check=True):
  train = ftjax_command(*train_command(workdir, '--config.train.log_every=1',
                                       '--config.data.eval_path=', *flags))
  if processes == 1:
    result = run_command(train, devices=devices)
  else:  # launch/local.py gives each process its devices (and drops XLA_FLAGS)
    result = run_command([sys.executable, f'{REPO}/launch/local.py', f'--processes={processes}',
                          f'--devices-per-process={devices // processes}', '--timeout=120', '--',
                          *train], devices=None)
  if check:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return result


def _losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [r['loss'] for r in map(json.loads, f) if 'loss' in r]


@pytest.mark.slow
def test_two_processes_train_like_one_process_with_eight_devices(tmp_path):
  _train(tmp_path / 'one', '--config.train.steps=4')
  two = _train(tmp_path / 'two', '--config.train.steps=4', processes=2)
  assert '[0] ' in two.stdout and '[1] ' in two.stdout
  one_losses, two_losses = _losses(tmp_path / 'one'), _losses(tmp_path / 'two')
  assert len(two_losses) == 4  # process 0 alone writes metrics.jsonl
  assert two_losses == pytest.approx(one_losses, rel=1e-5)


@pytest.mark.slow
def test_checkpoints_move_between_process_counts(tmp_path):
  _train(tmp_path / 'straight', '--config.train.steps=6')
  for first, second in ((2, 1), (1, 2)):
    workdir = tmp_path / f'{first}to{second}'
    stopped = _train(workdir, '--config.train.steps=6', '--config.train.stop_at_step=3',
                     processes=first, check=False)
    assert stopped.returncode == RESTART, stopped.stdout[-3000:] + stopped.stderr[-3000:]
    resumed = _train(workdir, '--config.train.steps=6', processes=second)
    assert 'resumed from step 3' in resumed.stdout
    assert _losses(workdir) == pytest.approx(_losses(tmp_path / 'straight'), rel=1e-5)


def test_a_process_that_never_joins_fails_fast_with_a_clear_message(tmp_path):
  env = dict(os.environ, FTJAX_COORDINATOR='127.0.0.1:1', FTJAX_NUM_PROCESSES='2',
             FTJAX_PROCESS_ID='1', FTJAX_DISTRIBUTED_TIMEOUT='5')
  result = run_ftjax('train', '--config', f'{REPO}/configs/demo.py', f'--workdir={tmp_path}',
                     devices=None, env=env, timeout=120)
  assert result.returncode == 2
  assert 'process 1 could not join the run within 5s' in result.stderr
  assert 'the coordinator (process 0) at 127.0.0.1:1 never answered' in result.stderr


def _one_and_two(tmp_path, *flags):
  """Metrics rows with a loss of the same run on 1 process x 8 devices and 2 x 4."""
  _train(tmp_path / 'one', *flags)
  _train(tmp_path / 'two', *flags, processes=2)
  rows = {}
  for name in ('one', 'two'):
    with open(tmp_path / name / 'metrics.jsonl') as f:
      rows[name] = [r for r in map(json.loads, f) if 'loss' in r]
  return rows['one'], rows['two']


@pytest.mark.slow
def test_two_processes_run_dpo_like_one_process(tmp_path):
  pairs = ('--config.objective.kind=dpo', f'--config.data.path={REPO}/data/demo_dpo/train.jsonl',
           '--config.data.seq_len=24', '--config.train.steps=3')
  one, two = _one_and_two(tmp_path, *pairs)
  assert len(two) == 3
  for a, b in zip(one, two, strict=True):
    for key in ('loss', 'reward_accuracy', 'reward_margin', 'logps_chosen', 'logps_rejected'):
      assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key


@pytest.mark.slow
def test_two_processes_run_grpo_like_one_process(tmp_path):
  # Rollouts are sampled on the global mesh and each process scores its own rows: the losses,
  # rewards and sampled lengths of 2 processes x 4 devices equal 1 process x 8 devices.
  grpo = ('--config.objective.kind=grpo', '--config.objective.group_size=4',
          '--config.objective.prompts_per_step=4', '--config.objective.max_new_tokens=4',
          "--config.objective.rewards=({'fn': 'regex', 'pattern': '[0-9]', 'search': True},)",
          '--config.objective.temperature=2.0', '--config.train.steps=4')
  one, two = _one_and_two(tmp_path, *grpo)
  assert len(two) == 4
  assert any(r['reward_std'] > 0 for r in one)  # the rewards differ within the batch
  for a, b in zip(one, two, strict=True):
    for key in ('loss', 'grad_norm', 'reward', 'completion_length', 'entropy'):
      assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
