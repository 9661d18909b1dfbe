"""Never lose a user's work: non-finite steps, damaged checkpoints, locked and refused workdirs."""

import logging
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from helpers import cli_env, run_ftjax, start_ftjax, train_command

from conftest import REPO, write_jsonl
from ftjax import checkpoint, data, metrics, plot, resume, tokenizer, train, workdir


@pytest.fixture
def config(small_config):
  small_config.train.update(steps=4, log_every=1)
  small_config.ckpt.every_steps = 2
  return small_config


def _snapshot(root):
  """Every file under `root` with its size and modification time."""
  out = {}
  for base, _, names in os.walk(root):
    for name in names:
      path = os.path.join(base, name)
      st = os.stat(path)
      out[os.path.relpath(path, root)] = (st.st_size, st.st_mtime_ns)
  return out


def _saved_params(workdir_path, step):
  manager = checkpoint.Manager(checkpoint.directory(workdir_path), max_to_keep=None)
  meta = manager.metadata(step)
  manager.close()
  leaves = checkpoint.ocp.StandardCheckpointer().restore(
      os.path.join(checkpoint.directory(workdir_path), str(step), 'state'))
  return meta, leaves['params']


# --- non-finite training -------------------------------------------------------------------------

@pytest.mark.slow
def test_non_finite_loss_stops_the_run_and_is_never_saved(config, tmp_path):
  # An absurd learning rate: step 1's update makes the weights huge, step 2's loss overflows.
  config.optim.update(lr=1e30, warmup_steps=0, clip_norm=0.0)
  config.train.update(steps=6)
  config.ckpt.update(every_steps=1, max_to_keep=1)
  with pytest.raises(train.NonFiniteError, match=r'non-finite at step 2.*last good checkpoint is '
                                                 r'.*checkpoints/1 .*train\.nan_policy=skip_step'):
    train.run(config, str(tmp_path))
  assert workdir.has_checkpoints(str(tmp_path)) == [1]  # rotation kept the last finite one
  _, params = _saved_params(str(tmp_path), 1)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


@pytest.mark.slow
def test_skip_step_policy_keeps_the_weights_of_the_last_finite_step(config, tmp_path):
  config.optim.update(lr=1e30, warmup_steps=0, clip_norm=0.0)
  config.train.update(steps=4, nan_policy='skip_step')
  config.ckpt.update(every_steps=1, max_to_keep=None)
  summary = train.run(config, str(tmp_path))
  assert summary['nonfinite_steps'] == 3
  rows = metrics.read_rows(str(tmp_path / 'metrics.jsonl'))
  assert [r['nonfinite_steps'] for r in rows if 'loss' in r] == [0, 1, 2, 3]
  _, after_1 = _saved_params(str(tmp_path), 1)
  _, after_4 = _saved_params(str(tmp_path), 4)
  jax.tree.map(np.testing.assert_array_equal, after_4, after_1)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(after_4))


# --- damaged checkpoints -------------------------------------------------------------------------

def _largest_file(step_dir):
  files = [os.path.join(b, n) for b, _, ns in os.walk(os.path.join(step_dir, 'state')) for n in ns]
  return max(files, key=os.path.getsize)


@pytest.mark.slow
def test_a_flipped_byte_is_detected_and_the_run_falls_back(config, tmp_path, capsys):
  train.run(config, str(tmp_path))
  step_dir = os.path.join(checkpoint.directory(str(tmp_path)), '4')
  assert checkpoint.verify(step_dir) is None and os.path.isfile(
      os.path.join(step_dir, checkpoint.CHECKSUMS))
  victim = _largest_file(step_dir)
  with open(victim, 'r+b') as f:
    f.seek(os.path.getsize(victim) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0x40]))
  assert 'checksum mismatch' in checkpoint.verify(step_dir)
  config.train.steps = 6
  summary = train.run(config, str(tmp_path))
  out = capsys.readouterr().out
  assert f'checkpoint 4 is damaged ({victim}: checksum mismatch' in out
  assert 'resumed from step 2' in out and summary['preempted_at'] is None
  assert os.path.isdir(tmp_path / 'checkpoints_corrupt' / '4')  # kept, not deleted
  assert workdir.has_checkpoints(str(tmp_path))[-1] == 6


@pytest.mark.slow
def test_missing_and_truncated_files_name_the_checkpoint_and_the_file(config, tmp_path):
  train.run(config, str(tmp_path))
  root = checkpoint.directory(str(tmp_path))
  os.remove(os.path.join(root, '4', 'state', '_METADATA'))
  victim = _largest_file(os.path.join(root, '2'))
  with open(victim, 'r+b') as f:
    f.truncate(os.path.getsize(victim) // 2)
  with pytest.raises(checkpoint.CheckpointError) as e:
    train.run(config, str(tmp_path))
  message = str(e.value)
  assert '\n' not in message and 'no intact checkpoint' in message
  assert 'step 4: ' in message and '_METADATA: missing' in message
  assert f'step 2: {victim}: truncated' in message
  assert 'LoRA' not in message


def test_restore_does_not_warn_about_checkpoint_metadata(config, tmp_path, caplog):
  config.train.stop_at_step = 2
  train.run(config, str(tmp_path))
  config.train.stop_at_step = 0
  with caplog.at_level(logging.WARNING):
    train.run(config, str(tmp_path))
  assert not [r for r in caplog.records if '_CHECKPOINT_METADATA' in r.getMessage()]


# --- run directories -----------------------------------------------------------------------------

HOLD = """
import sys, time
from ftjax import workdir
d = workdir.RunDir(sys.argv[1], resume='auto', overwrite=False)
d.commit()
print('holding', flush=True)
time.sleep(120)
"""


@pytest.mark.slow
def test_a_live_run_holds_its_workdir_and_a_killed_one_does_not(config, tmp_path):
  holder = subprocess.Popen([sys.executable, '-c', HOLD, str(tmp_path)], stdout=subprocess.PIPE,
                            text=True, cwd=REPO, env=cli_env())
  try:
    assert holder.stdout.readline().strip() == 'holding'
    held = rf'in use by another run \(pid {holder.pid} on '
    with pytest.raises(workdir.WorkdirError, match=held):
      train.run(config, str(tmp_path))
    assert not os.path.exists(tmp_path / 'config.json')
  finally:
    holder.kill()  # a crash: the kernel drops the lock with the process
    holder.wait()
  assert train.run(config, str(tmp_path))['preempted_at'] is None


@pytest.mark.slow
def test_resume_never_refuses_existing_checkpoints_unless_overwrite(config, tmp_path):
  train.run(config, str(tmp_path))
  before = _snapshot(tmp_path)
  config.ckpt.resume = 'never'
  with pytest.raises(workdir.WorkdirError, match=r'already holds checkpoints \(steps \[2, 4\]\).*'
                                                 r'--config\.ckpt\.overwrite=True'):
    train.run(config, str(tmp_path))
  assert _snapshot(tmp_path) == before
  config.ckpt.overwrite = True
  config.train.steps = 2
  train.run(config, str(tmp_path))
  assert workdir.has_checkpoints(str(tmp_path)) == [2]
  rows = metrics.read_rows(str(tmp_path / 'metrics.jsonl'))
  assert [r['step'] for r in rows if 'loss' in r] == [1, 2]  # the first run's rows are gone


@pytest.mark.slow
def test_a_refused_resume_leaves_the_run_directory_as_it_was(config, tmp_path):
  train.run(config, str(tmp_path))
  before = _snapshot(tmp_path)
  config.model.mlp_dim = 96  # does not fit the checkpoint
  with pytest.raises(checkpoint.CheckpointError, match='in the checkpoint, but the model expects'):
    train.run(config, str(tmp_path))
  assert _snapshot(tmp_path) == before


@pytest.mark.slow
def test_resuming_from_an_older_step_replaces_the_newer_checkpoints(config, tmp_path, capsys):
  train.run(config, str(tmp_path))
  _, first_4 = _saved_params(str(tmp_path), 4)
  config.ckpt.resume = str(tmp_path / 'checkpoints' / '2')
  config.optim.lr = 1e-2  # a different second half, so the new step 4 differs from the old one
  train.run(config, str(tmp_path))
  assert 'the newer checkpoints [4] will be replaced' in capsys.readouterr().out
  _, second_4 = _saved_params(str(tmp_path), 4)
  diffs = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(), first_4, second_4))
  assert max(diffs) > 0
  assert workdir.has_checkpoints(str(tmp_path)) == [2, 4]


@pytest.mark.slow
def test_a_torn_metrics_line_is_ignored_on_resume_and_by_plot(config, tmp_path, caplog):
  config.train.stop_at_step = 2
  train.run(config, str(tmp_path))
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 3, "lo')  # a writer killed mid-line
  config.train.stop_at_step = 0
  with caplog.at_level(logging.WARNING):
    train.run(config, str(tmp_path))
    rows = metrics.read_rows(str(tmp_path / 'metrics.jsonl'))
  assert [r['step'] for r in rows if 'loss' in r] == [1, 2, 3, 4]
  assert any('torn' in r.getMessage() or 'cut off' in r.getMessage() for r in caplog.records)
  assert os.path.getsize(plot.plot(str(tmp_path))) > 1000


@pytest.mark.slow
def test_steps_below_the_checkpoint_say_so(config, tmp_path, capsys):
  train.run(config, str(tmp_path))
  config.train.steps = 2
  summary = train.run(config, str(tmp_path))
  assert summary['nothing_to_do'] and 'eval_loss_before' not in summary
  assert ('nothing to train: the checkpoint is at step 4 and train.steps=2'
          in capsys.readouterr().out)


# --- changes on resume ---------------------------------------------------------------------------

@pytest.mark.slow
def test_changes_on_resume_are_printed(config, tmp_path, capsys):
  config.data.pack = False
  config.train.stop_at_step = 2
  train.run(config, str(tmp_path))
  config.train.stop_at_step = 0
  config.optim.lr = 1e-3
  config.data.global_batch = 16
  train.run(config, str(tmp_path))
  out = capsys.readouterr().out
  assert 'resume: optim.lr changed since the checkpoint: 0.003 -> 0.001' in out
  assert 'resume: data.global_batch changed since the checkpoint: 8 -> 16' in out
  assert 'the data position stays at record 16 of the stream (batch 1)' in out


def test_a_changed_batch_size_keeps_the_position_in_records(tmp_path):
  path = write_jsonl(tmp_path / 'd.jsonl', [{'text': f'record {i:03d}'} for i in range(40)])
  options = data.Options(tokenizer=tokenizer.BYTE, seq_len=16)
  sources = [data.Source(path)]
  old = data.train_batches(sources, options, global_batch=6, seed=0, pack=False)
  for _ in range(2):
    next(old)  # 12 records consumed
  new = data.train_batches(sources, options, global_batch=4, seed=0, pack=False)
  new.set_state(old.get_state())
  start = resume.Start(manager=None)
  saved = {'data': {'global_batch': 6}}

  class Data:  # just the fields of config.Data that _keep_data_position reads
    global_batch, pack = 4, False

  resume._keep_data_position(saved, Data, new, start)
  reference = data.train_batches(sources, options, global_batch=4, seed=0, pack=False)
  for _ in range(3):
    next(reference)  # 12 records
  np.testing.assert_array_equal(next(new)['tokens'], next(reference)['tokens'])
  assert 'record 12 of the stream (batch 3)' in start.notes[0]


# --- signals (the process's behaviour: subprocesses) ---------------------------------------------

def _wait_for_steps(proc, workdir_path, count, timeout=240):
  deadline = time.time() + timeout
  path = os.path.join(workdir_path, 'metrics.jsonl')
  while time.time() < deadline:
    if os.path.isfile(path) and len([r for r in metrics.read_rows(path) if 'loss' in r]) >= count:
      return
    assert proc.poll() is None, 'the run ended early'
    time.sleep(0.05)
  raise AssertionError('no progress')


@pytest.mark.slow
def test_ctrl_c_saves_and_exits_75(tmp_path):
  flags = ['--config.train.steps=2000', '--config.train.log_every=1',
           '--config.ckpt.every_steps=5000', '--config.eval.every_steps=0']
  proc = start_ftjax(*train_command(tmp_path, *flags), stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE, text=True)
  _wait_for_steps(proc, tmp_path, 3)
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=240)
  assert proc.returncode == resume.EXIT_RESTART, err[-2000:]
  assert 'interrupted: saving a checkpoint' in out
  saved = workdir.has_checkpoints(str(tmp_path))
  assert len(saved) == 1 and f'stopped after step {saved[0]}' in out


def test_a_second_ctrl_c_aborts_at_once():
  # Real signals to this process; each handler runs before the next signal is sent (two
  # signals in quick succession can reach Python as one).
  said = []
  preemption = resume.Preemption(said.append)
  try:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.05)
    assert preemption.requested and said and 'Ctrl-C again aborts' in said[0]
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.05)
  finally:
    preemption.close()
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.slow
def test_sigterm_interrupts_a_pipeline_that_is_waiting_for_data(tmp_path):
  # One usable record among thousands that are skipped: every batch takes many epochs of
  # encoding, so the loop sits in the data pipeline when SIGTERM arrives.
  records = [{'prompt': 'x' * 3000, 'completion': 'y'}] * 4000 + [{'prompt': '1+1=',
                                                                    'completion': '2'}]
  path = write_jsonl(tmp_path / 'slow.jsonl', records)
  proc = start_ftjax(
      *train_command(tmp_path / 'run', f'--config.data.path={path}', '--config.data.eval_path=',
                     '--config.eval.every_steps=0', '--config.data.on_too_long=skip',
                     '--config.train.steps=50'),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  while time.time() < deadline and not os.path.isfile(tmp_path / 'run' / 'config.json'):
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    time.sleep(0.05)
  time.sleep(3)
  sent = time.time()
  proc.terminate()
  out, err = proc.communicate(timeout=60)
  assert proc.returncode == resume.EXIT_RESTART, err[-2000:]
  assert time.time() - sent < 30
  assert 'stopped' in out


@pytest.mark.slow
def test_a_pretrained_run_names_its_architecture(small_config, hf_folder, tmp_path, capsys):
  for key in ('vocab_size', 'embed_dim', 'mlp_dim', 'num_layers', 'num_heads', 'num_kv_heads',
              'head_dim'):
    small_config.model[key] = None
  small_config.model.pretrained = hf_folder
  small_config.train.update(steps=1)
  train.run(small_config, str(tmp_path / 'run'))
  first = capsys.readouterr().out.splitlines()[0]
  assert first.startswith(f'ftjax: qwen3 from {hf_folder} (') and 'tiny' not in first


@pytest.mark.slow
def test_an_error_mid_run_waits_for_the_save_in_flight(tmp_path):
  # One record too long for data.on_too_long=error, where the preflight sample does not look:
  # the run meets it mid-epoch, with a checkpoint save started at every step.
  count = 2000
  sampled = set(np.linspace(0, count - 1, 512).astype(int))
  bad = next(i for i in range(count // 2, count) if i not in sampled)
  records = [{'prompt': f'{i % 10}+{i % 7}=', 'completion': str(i % 10 + i % 7)}
             for i in range(count)]
  records[bad] = {'prompt': 'x' * 500, 'completion': 'y'}
  path = write_jsonl(tmp_path / 'd.jsonl', records)
  result = run_ftjax(
      *train_command(tmp_path / 'run', f'--config.data.path={path}', '--config.data.eval_path=',
                     '--config.eval.every_steps=0', '--config.data.on_too_long=error',
                     '--config.ckpt.every_steps=1', '--config.ckpt.max_to_keep=0',
                     '--config.train.steps=400'),
      timeout=600)
  assert result.returncode == 2, result.stderr[-2000:]
  assert f'd.jsonl:{bad + 1}: example has' in result.stderr
  root = tmp_path / 'run' / 'checkpoints'
  saved = workdir.has_checkpoints(str(tmp_path / 'run'))
  assert saved and sorted(os.listdir(root)) == sorted(str(s) for s in saved)  # no temporary
  assert all(checkpoint.verify(str(root / str(s))) is None for s in saved)
