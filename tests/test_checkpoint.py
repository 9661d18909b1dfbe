"""Checkpoints never lose work: exact resume, kill -9 mid-save, SIGTERM, restore on another mesh."""

import json
import os
import shutil
import signal
import subprocess
import time

import jax
import numpy as np
import pytest
from helpers import run_ftjax, start_ftjax, train_command

from ftjax import checkpoint, sharding, train, trained
from ftjax.hf import pretrained


def _losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return {r['step']: r['loss'] for r in map(json.loads, f) if 'loss' in r}


def _params(workdir):
  arch = trained.read_run(workdir).model.arch
  _, abstract = pretrained.abstract_model(arch)
  mesh = sharding.make_mesh((1, -1, 1))
  shardings = sharding.state_shardings(abstract, mesh, sharding.RULES['fsdp'])
  return jax.device_get(checkpoint.restore_params(workdir, abstract, shardings))


@pytest.fixture
def config(small_config):
  small_config.data.pack = True
  small_config.train.update(steps=8, log_every=1)
  small_config.ckpt.every_steps = 100
  return small_config


@pytest.mark.slow
def test_resume_is_bitwise_identical_to_an_uninterrupted_run(config, tmp_path):
  train.run(config, str(tmp_path / 'straight'))
  config.train.stop_at_step = 3
  summary = train.run(config, str(tmp_path / 'resumed'))
  assert summary['preempted_at'] == 3
  assert checkpoint.latest_step(str(tmp_path / 'resumed')) == 3
  config.train.stop_at_step = 0
  train.run(config, str(tmp_path / 'resumed'))
  straight, resumed = _losses(tmp_path / 'straight'), _losses(tmp_path / 'resumed')
  assert [resumed[s] for s in range(4, 9)] == [straight[s] for s in range(4, 9)]
  jax.tree.map(np.testing.assert_array_equal, _params(str(tmp_path / 'resumed')),
               _params(str(tmp_path / 'straight')))


@pytest.mark.slow
def test_restore_on_another_mesh_continues_with_the_same_loss(config, tmp_path):
  config.mesh.shape = (1, 8, 1)
  config.train.stop_at_step = 3
  train.run(config, str(tmp_path / 'a'))
  shutil.copytree(tmp_path / 'a', tmp_path / 'b')
  config.train.stop_at_step = 0
  train.run(config, str(tmp_path / 'a'))
  config.mesh.shape = (2, 2, 2)
  train.run(config, str(tmp_path / 'b'))
  same, other = _losses(tmp_path / 'a'), _losses(tmp_path / 'b')
  for step in range(4, 9):
    assert other[step] == pytest.approx(same[step], rel=1e-5)


@pytest.mark.slow
def test_incompatible_checkpoint_names_what_differs(config, tmp_path):
  config.train.stop_at_step = 2
  train.run(config, str(tmp_path))
  config.model.mlp_dim = 96
  with pytest.raises(checkpoint.CheckpointError,
                     match=r'params\.blocks\.mlp\.\w+\.w\.value has shape \(2, \d+, \d+\) in the '
                           r'checkpoint, but the model expects \(2, \d+, \d+\)'):
    train.run(config, str(tmp_path))


# Big enough (~25M parameters, 300 MB with Adam state) that a save takes a while.
SLOW_SAVE = ['--config.model.embed_dim=512', '--config.model.mlp_dim=2048',
             '--config.model.num_layers=6', '--config.model.num_heads=8',
             '--config.model.num_kv_heads=8', '--config.model.head_dim=64',
             '--config.model.vocab_size=2048', '--config.data.global_batch=8',
             '--config.train.log_every=1', '--config.eval.every_steps=0',
             '--config.data.eval_path=', '--config.ckpt.every_steps=2']


def _committed(workdir):
  root = os.path.join(workdir, 'checkpoints')
  return sorted(int(d) for d in os.listdir(root) if d.isdigit()) if os.path.isdir(root) else []


def _temporary(workdir):
  root = os.path.join(workdir, 'checkpoints')
  return [d for d in os.listdir(root) if not d.isdigit()] if os.path.isdir(root) else []


@pytest.mark.slow
def test_kill_9_during_an_async_save_then_resume(tmp_path):
  proc = start_ftjax(*train_command(tmp_path, '--config.train.steps=30', *SLOW_SAVE),
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  while time.time() < deadline and not (_committed(tmp_path) and _temporary(tmp_path)):
    time.sleep(0.005)
  proc.kill()  # SIGKILL while a save is being written
  proc.wait()
  assert _temporary(tmp_path), 'no save was in flight when the process was killed'
  committed = _committed(tmp_path)
  assert committed and checkpoint.latest_step(str(tmp_path)) == committed[-1]
  result = run_ftjax(*train_command(tmp_path, '--config.train.steps=30', *SLOW_SAVE),
                     timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  assert f'resumed from step {committed[-1]}' in result.stdout
  assert _committed(tmp_path)[-1] == 30 and not _temporary(tmp_path)


@pytest.mark.slow
def test_sigterm_saves_and_exits_with_the_restart_code(tmp_path):
  flags = ['--config.train.steps=400', '--config.train.log_every=1',
           '--config.ckpt.every_steps=1000']
  proc = start_ftjax(*train_command(tmp_path, *flags), stdout=subprocess.PIPE,
                     stderr=subprocess.DEVNULL, text=True)
  metrics = tmp_path / 'metrics.jsonl'
  deadline = time.time() + 240
  while time.time() < deadline and not (metrics.exists() and len(_losses(tmp_path)) >= 5):
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=240)
  assert proc.returncode == train.EXIT_RESTART, out
  saved = _committed(tmp_path)
  assert len(saved) == 1 and 5 <= saved[0] < 400
  assert f'stopped after step {saved[0]}' in out
  result = run_ftjax(*train_command(tmp_path, *flags, '--config.train.steps=400'), timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  assert f'resumed from step {saved[0]}' in result.stdout
