"""Every config builds; bad configs fail fast with one line that names the problem."""

import glob
import json
import os
import runpy

import ml_collections
import pytest
from helpers import run_ftjax, train_command
from ml_collections import config_flags  # noqa: F401  (registers the config loader)

from conftest import REPO
from ftjax import config as ftjax_config
from ftjax import models

CONFIG_FILES = sorted(p for p in glob.glob(os.path.join(REPO, 'configs', '*.py'))
                      if not p.endswith('__init__.py'))


@pytest.mark.parametrize('path', CONFIG_FILES, ids=os.path.basename)
def test_every_config_builds_locks_and_names_a_preset(path):

  config = runpy.run_path(path)['get_config']()
  config.lock()
  assert config.model.preset in models.PRESETS
  schema = runpy.run_path(os.path.join(REPO, 'configs', 'base.py'))['get_config']()
  ftjax_config._check_keys(config, schema)
  with pytest.raises(AttributeError):
    config.model.no_such_key = 1  # locked: unknown keys are refused


def _assert_one_line_error(result, *fragments):
  assert result.returncode == 2, result.stderr[-2000:]
  lines = [l for l in result.stderr.splitlines() if l.startswith('ftjax: error:')]
  assert len(lines) == 1, result.stderr[-2000:]
  assert 'Traceback' not in result.stderr
  for fragment in fragments:
    assert fragment in lines[0]


def test_unknown_key(tmp_path):
  result = run_ftjax(*train_command(tmp_path, '--config.model.num_layerz=3'))
  _assert_one_line_error(result, "unknown config key 'model.num_layerz'", 'num_layers')


def test_wrong_type(tmp_path):
  result = run_ftjax(*train_command(tmp_path, '--config.train.steps=many'))
  _assert_one_line_error(result, '--config.train.steps=many', 'int')


@pytest.mark.slow
def test_mesh_that_does_not_match_the_devices(tmp_path):
  result = run_ftjax(*train_command(tmp_path, '--config.mesh.shape=(3,1,1)'), devices=4)
  _assert_one_line_error(result, 'mesh.shape=(3, 1, 1) needs 3 devices, but 4 are available')


@pytest.mark.slow
def test_batch_that_does_not_divide_over_the_mesh(tmp_path):
  result = run_ftjax(*train_command(tmp_path, '--config.data.global_batch=12'), devices=8)
  _assert_one_line_error(result, 'data.global_batch=12 must be divisible by the 8 batch shards')


@pytest.mark.slow
def test_missing_data_file(tmp_path):
  result = run_ftjax(*train_command(tmp_path, '--config.data.path=/no/such/train.jsonl'))
  _assert_one_line_error(result, "data source '/no/such/train.jsonl': file not found")


@pytest.mark.slow
def test_malformed_data_line(tmp_path):
  bad = tmp_path / 'bad.jsonl'
  bad.write_text('{"prompt": "1+1=", "completion": "2"}\n{"prompt": "2+2="}\n')
  result = run_ftjax(*train_command(tmp_path, f'--config.data.path={bad}'))
  _assert_one_line_error(result, f'{bad}:2:', '"completion"')


def test_unknown_preset_and_choice():
  config = _demo_config()
  config.model.preset = 'llama9'
  with pytest.raises(ftjax_config.ConfigError, match="model.preset='llama9' is not a known preset"):
    ftjax_config.resolve(config)
  config = _demo_config()
  config.optim.schedule = 'cosinus'
  with pytest.raises(ftjax_config.ConfigError, match="optim.schedule='cosinus' is not one of"):
    ftjax_config.resolve(config)


def test_key_added_by_an_experiment_file_is_refused():
  config = _demo_config()
  with config.unlocked():
    config.optim.learning_rate = 1e-3  # a typo for optim.lr
  with pytest.raises(ftjax_config.ConfigError, match="'optim.learning_rate' is not defined"):
    ftjax_config.resolve(config)


def _demo_config() -> ml_collections.ConfigDict:
  return runpy.run_path(os.path.join(REPO, 'configs', 'demo.py'))['get_config']()


def test_data_commands(tmp_path):
  prepare = run_ftjax('data', 'prepare', f'--source={REPO}/data/demo/eval.jsonl',
                      f'--out={tmp_path}/eval.array_record')
  assert prepare.returncode == 0, prepare.stderr[-2000:]
  assert 'wrote 200 records' in prepare.stdout
  bench = run_ftjax('data', 'bench', '--config', f'{REPO}/configs/demo.py',
                    f'--config.data.path={tmp_path}/eval.array_record', '--batches=3')
  assert bench.returncode == 0, bench.stderr[-2000:]
  result = json.loads(bench.stdout.strip().splitlines()[-1])
  assert result['tokens_per_s'] > 0 and result['batches'] == 3
