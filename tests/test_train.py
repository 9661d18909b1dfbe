"""End-to-end training runs through `train.run`, on real computation."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from conftest import write_jsonl
from ftjax import config as config_lib
from ftjax import train
from ftjax import trainer as trainer_lib


def _rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
def test_loss_falls_and_outputs_are_written(small_config, tmp_path):
  # Eight records, a batch of eight: every step sees the same examples, so loss must collapse.
  records = [{'prompt': f'{a}+{a}=', 'completion': str(2 * a)} for a in range(8)]
  small_config.data.path = write_jsonl(tmp_path / 'repeated.jsonl', records)
  small_config.optim.lr = 1e-2
  small_config.train.update(steps=40, log_every=10)
  small_config.eval.update(every_steps=20)
  summary = train.run(small_config, str(tmp_path))
  rows = _rows(tmp_path)
  assert [r['step'] for r in rows] == [0, 10, 20, 30, 40]
  for r in rows[1:]:
    assert {'loss', 'learning_rate', 'grad_norm', 'tokens_per_s', 'tokens_per_s_per_device',
            'step_s', 'mfu', 'model_tflops_per_step', 'packing_efficiency',
            'skipped_records'} <= set(r)
    assert r['tokens_per_s'] > 0 and 0 < r['packing_efficiency'] <= 1
    assert r['tokens_per_s_per_device'] == pytest.approx(r['tokens_per_s'] / 8)
    assert 0 < r['mfu'] < 1.5 and r['model_tflops_per_step'] > 0
    assert r['skipped_records'] == 0
  assert {'eval_loss', 'eval_perplexity', 'eval_accuracy'} <= set(rows[2])
  assert rows[-1]['loss'] < 0.2 * rows[1]['loss']
  assert summary['eval_loss_after'] < summary['eval_loss_before']
  # The train step traced and compiled once for all 40 steps.
  assert summary['train_step_compiles'] == 1
  resolved = json.loads((tmp_path / 'config.json').read_text())
  assert resolved['train']['steps'] == 40
  assert resolved['resolved_model']['embed_dim'] == 32
  events = event_accumulator.EventAccumulator(str(tmp_path / 'tensorboard'))
  events.Reload()
  losses = [e.value for e in events.Scalars('loss')]
  assert losses == pytest.approx([r['loss'] for r in rows[1:]], rel=1e-6)


@pytest.mark.slow
def test_grad_accumulation_matches_one_big_batch(small_config, tmp_path):
  small_config.train.update(steps=3, log_every=1)
  small_config.mesh.shape = (2, 2, 2)
  small_config.data.global_batch = 16
  train.run(small_config, str(tmp_path / 'one'))
  small_config.optim.grad_accum = 2
  train.run(small_config, str(tmp_path / 'four'))
  one, four = _rows(tmp_path / 'one'), _rows(tmp_path / 'four')
  for a, b in zip(one[1:], four[1:], strict=True):
    assert b['loss'] == pytest.approx(a['loss'], rel=1e-5)
    assert b['grad_norm'] == pytest.approx(a['grad_norm'], rel=1e-5)


@pytest.mark.slow
def test_weight_decay_skips_norms_and_embeddings(small_config):
  from ftjax import optim

  arch = config_lib.model_config(small_config.model)
  optim_kwargs = {**config_lib.resolve(small_config).optim.make_kwargs(), 'steps': 10}
  trainer = trainer_lib.setup(arch=arch, model_options={}, mesh_shape=(1, 1, 1), rules_name='fsdp',
                              optim_kwargs=optim_kwargs, grad_accum=1, global_batch=8, seed=0,
                              devices=jax.devices()[:1])
  mask = optim.decay_mask(trainer.state.params, decay_embeddings=False)
  flat = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_leaves_with_path(mask)}
  assert not any(m for k, m in flat.items() if 'norm' in k or "['embed']" in k)
  assert all(m for k, m in flat.items() if "['w']" in k)


def test_schedule_warms_up_then_decays():
  from ftjax import optim

  lr = optim.schedule(lr=1.0, steps=100, warmup_steps=10, decay='cosine', end_lr_ratio=0.1)
  values = np.array([float(lr(s)) for s in range(101)])
  assert values[0] == pytest.approx(0.1) and values[9] < 1.0
  assert values[10] == pytest.approx(1.0)
  assert np.all(np.diff(values[:11]) > 0) and np.all(np.diff(values[10:]) <= 1e-7)
  assert values[100] == pytest.approx(0.1)
  linear = optim.schedule(lr=1.0, steps=100, warmup_steps=0, decay='linear', end_lr_ratio=0.0)
  assert float(linear(50)) == pytest.approx(0.5)


@pytest.mark.slow
@pytest.mark.parametrize('dtype,remat', [('bfloat16', 'dots'), ('float32', 'full')])
def test_bf16_and_remat_runs_train(small_config, tmp_path, dtype, remat):
  small_config.model.update(dtype=dtype, param_dtype=dtype, remat=remat)
  small_config.train.update(steps=8, log_every=4)
  small_config.optim.lr = 1e-2
  summary = train.run(small_config, str(tmp_path))
  rows = _rows(tmp_path)
  assert all(np.isfinite(r['loss']) for r in rows[1:])
  assert rows[-1]['loss'] < rows[1]['loss']
  assert summary['train_step_compiles'] == 1


@pytest.mark.slow
def test_skipped_records_reach_metrics_and_summary(small_config, tmp_path, capsys):
  records = [{'prompt': f'{a}+{a}=', 'completion': str(2 * a)} for a in range(8)]
  path = write_jsonl(tmp_path / 'mixed.jsonl', records)
  with open(path, 'a') as f:
    f.write('this line is not JSON\n{"promptx": "?"}\n')
  small_config.data.update(path=path, on_bad_record='skip')
  small_config.train.update(steps=4, log_every=4)
  summary = train.run(small_config, str(tmp_path / 'run'))
  assert summary['skipped_records']['bad_json'] >= 1
  assert summary['skipped_records']['unknown_format'] >= 1
  assert _rows(tmp_path / 'run')[-1]['skipped_records'] >= 2
  assert "skipped records {'bad_json'" in capsys.readouterr().out


def test_a_run_makes_no_implicit_host_device_copies(small_config, tmp_path):
  # Every transfer in set-up, the loop, checkpoints and evals is an explicit device_put/get.
  small_config.eval.every_steps = 2
  small_config.ckpt.every_steps = 2
  with jax.transfer_guard('disallow'):
    summary = train.run(small_config, str(tmp_path))
  assert summary['train_step_compiles'] == 1 and np.isfinite(summary['final_loss'])


@pytest.mark.skipif(importlib.util.find_spec('torch') is None, reason='needs torch installed')
def test_run_outputs_do_not_import_torch(tmp_path):
  """tensorboardX imports torch whenever it is installed (~240 MB resident, a second of
  start-up); the run's writer loads it without, and still writes TensorBoard events."""
  script = (
      'import sys\n'
      'from ftjax import main, metrics, train\n'
      f'w = metrics.Writer({str(tmp_path)!r}, total_steps=1, progress=False)\n'
      "w.write(1, {'loss': 0.5})\n"
      'w.close()\n'
      "assert 'torch' not in sys.modules, 'torch was imported'\n"
      'import torch\n'  # and a later import of torch by the user still works
      'print(torch.ones(2).sum().item())\n')
  out = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split()[-1] == '2.0'
  events = event_accumulator.EventAccumulator(str(tmp_path / 'tensorboard'))
  events.Reload()
  assert [e.value for e in events.Scalars('loss')] == [0.5]
