"""`ftjax plan`: accelerator-type names, and an ahead-of-time compile for a TPU slice."""

import json
import os

import pytest
from helpers import run_ftjax

from conftest import REPO
from ftjax import plan


@pytest.mark.parametrize('name, chip, shape', [
    ('v5e-8', 'v5e', (2, 4)), ('v5litepod-8', 'v5e', (2, 4)), ('v5e-256', 'v5e', (16, 16)),
    ('v6e-8', 'v6e', (2, 4)), ('v4-32', 'v4', (2, 2, 4)), ('v5p-64', 'v5p', (2, 4, 4)),
    ('v5p-8', 'v5p', (2, 2, 1)),
])
def test_accelerator_types(name, chip, shape):
  c, s = plan.parse_topology(name)
  assert (c.name, s) == (chip, shape)


@pytest.mark.parametrize('name', ['v7-8', 'v5e', 'v5e-12', 'h100-8'])
def test_unknown_topology_is_refused(name):
  with pytest.raises(plan.PlanError, match='topology'):
    plan.parse_topology(name)


def test_gpu_topology_says_why():
  with pytest.raises(plan.PlanError, match='CUDA plugin'):
    plan.parse_topology('h200-8')


def _plan(*overrides):
  env = dict(os.environ, TPU_SKIP_MDS_QUERY='1', TPU_WORKER_HOSTNAMES='localhost',
             TPU_ACCELERATOR_TYPE='v5litepod-4')
  out = run_ftjax('plan', '--config', f'{REPO}/configs/demo.py', '--topology', 'v5e-4', *overrides,
                  devices=None, env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_plan_compiles_for_a_tpu_slice():
  try:
    import libtpu  # noqa: F401
  except ImportError:
    print("SKIPPED: libtpu is not installed (pip install -e '.[tpu]'); ftjax plan needs it")
    pytest.skip("libtpu is not installed (pip install -e '.[tpu]')")
  small = _plan()
  assert small['device_kind'] == 'TPU v5 lite' and small['num_devices'] == 4
  assert small['mesh'] == {'data': 1, 'fsdp': 4, 'expert': 1, 'tensor': 1}
  b = small['per_device_bytes']
  assert set(b) >= {'arguments', 'temporaries', 'outputs', 'total'}
  # Weights + Adam moments, split 4 ways (float32): at least 3 * 4 bytes * params / 4.
  assert b['arguments'] >= 3 * small['params']
  assert small['fits'] and small['suggestions'] == [] and small['device_hbm_bytes'] == 16 * 2**30
  # 16 rows of 16k tokens per chip: the attention scores alone exceed 16 GiB.
  big = _plan('--config.data.seq_len=16384', '--config.data.global_batch=64')
  assert not big['fits'] and big['per_device_bytes']['total'] > 16 * 2**30
  assert any('remat' in s for s in big['suggestions']), big['suggestions']


def test_importing_plan_leaves_the_environment_alone():
  """TPU_* variables would make `ftjax train` subprocesses think they run on a TPU VM."""
  import importlib

  before = dict(os.environ)
  importlib.reload(plan)
  assert dict(os.environ) == before


@pytest.mark.parametrize('remat, lighter', [('auto', 'offload'), ('none', 'dots'),
                                            ('dots', 'offload'), ('full', None)])
def test_remat_suggestion_follows_the_policy_the_planned_mesh_resolves(remat, lighter):
  """`remat='auto'` is resolved as the model resolves it on the plan's mesh (here CPU devices:
  `dots`), so the suggestion names the next lighter policy, and none past `full`."""
  from configs import demo
  from ftjax import config as config_lib
  from ftjax import sharding

  c = demo.get_config()
  c.model.remat = remat
  r = config_lib.resolve(c, check_files=False)
  gib = 2**30
  out = plan.suggestions(r, dict(total=20 * gib, temporaries=15 * gib, arguments=5 * gib),
                         16 * gib, sharding.make_mesh((1, -1, 1)))
  said = [s for s in out if 'activations dominate' in s]
  if lighter is None:
    assert said == []
  else:
    assert len(said) == 1 and said[0].split('--config.model.remat=')[1].startswith(lighter), out
